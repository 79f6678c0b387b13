"""A notebook user's console: `L.Trainer(...).fit(DPOModule(...), PreferenceDataModule(...))` from a script.

The script runs as a user runs it (a subprocess, from an empty folder, an 80-column terminal), and its
whole output is read back, as test_console.py does for the CLI: the same bar and summary as the CLI
(`DPOModule.configure_callbacks`), none of the third-party lines the CLI filters (`quiet.py`), the bar's
metrics and the validation table inside 80 columns with their names whole, the frozen reference shown as
such, and where the samples went. Only the committed quickstart assets; no network.
"""

import os
import subprocess
import sys
import warnings

import lightning as L
import pytest
from lightning.pytorch.trainer.connectors.logger_connector import logger_connector
from test_console import BROKEN_LOOKING

from dpo_lightning.utils import quiet
from dpo_lightning.utils.locate import PACKAGE

ASSETS = PACKAGE / "assets" / "sort-tiny"
SCRIPT = f"""
import lightning as L
from dpo_lightning import DPOModule, GenerateSamples, PreferenceDataModule, ValidationSummary

model = DPOModule("{ASSETS}", learning_rate=1e-4)
data = PreferenceDataModule("{ASSETS / 'train.jsonl'}", eval_dataset="{ASSETS / 'val.jsonl'}", max_length=32,
                            max_prompt_length=16, batch_size=32)
trainer = L.Trainer(max_steps=6, val_check_interval=3, check_val_every_n_epoch=None, limit_val_batches=2,
                    log_every_n_steps=1, accelerator="cpu",
                    callbacks=[ValidationSummary(), GenerateSamples(num_prompts=2, max_new_tokens=4, sample=False)])
trainer.fit(model, data)
"""
# Lightning's and transformers' lines that the CLI never shows, as a Python user saw them (issue 22).
RAW_LIGHTNING = ["Epoch ", "FLOPs", "tensorboardX", "will override existing callbacks"]


@pytest.fixture(scope="module")
def notebook_run(tmp_path_factory) -> str:
    """The whole console of a 6-step fit, validating at steps 3 and 6, started from an empty folder."""
    cwd = tmp_path_factory.mktemp("notebook")
    env = {**os.environ, "COLUMNS": "80"}  # rich fits its bar to the terminal width
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_python_console_has_none_of_the_raw_lightning_lines(notebook_run):
    bad = BROKEN_LOOKING + RAW_LIGHTNING
    assert [line for line in notebook_run.splitlines() if any(b in line for b in bad)] == []


def test_progress_bar_counts_steps_and_fits_80_columns_with_whole_names(notebook_run):
    lines = notebook_run.splitlines()
    bar = next(i for i, line in enumerate(lines) if line.startswith("step ") and "6/6" in line)
    train, val = lines[bar].split(), lines[bar + 1].split()
    assert train[-5:-3] == ["train:", "loss"] and train[-2] == "acc"
    assert val[:2] == ["val:", "loss"] and val[3] == "acc"
    assert len(lines[bar]) <= 80 and len(lines[bar + 1]) <= 80
    # A wrapped column continues on lines that start far right; only the bar's own val line may.
    assert [line for i, line in enumerate(lines) if line.startswith(" " * 30) and i != bar + 1] == []


def test_validation_table_fits_80_columns(notebook_run):
    table = notebook_run[notebook_run.index("\nvalidation "):].strip().splitlines()
    assert table[0].split() == ["validation", "step", "loss", "rewards/accuracies", "rewards/margins"]
    assert [row.split()[0] for row in table[1:4]] == ["0", "3", "6"]
    assert table[1].split()[1:] == ["0.6931", "0.5000", "0.0000"]  # step 0: policy == reference
    assert max(map(len, table[:4])) <= 80


def test_summary_shows_the_reference_frozen_and_the_console_says_where_the_samples_went(notebook_run):
    rows = [[cell.strip() for cell in line.split("|")] for line in notebook_run.splitlines() if "|" in line]
    assert {row[1]: row[-1] for row in rows if len(row) > 2}["ref"] == "frozen"  # Lightning's mode said train
    samples = next(line for line in notebook_run.splitlines() if line.startswith("[dpo_lightning] samples"))
    assert "step 3" in samples and os.path.join("lightning_logs", "version_0") in samples


def test_lightnings_tensorboardx_paragraph_is_filtered_and_other_warnings_still_show(monkeypatch, tmp_path):
    # Without tensorboard installed (a quickstart install), a Trainer without a logger argument printed a
    # paragraph on a Lightning 1.9 change; the test environment has tensorboard, so its absence is simulated.
    monkeypatch.setattr(logger_connector, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(logger_connector, "_TENSORBOARDX_AVAILABLE", False)
    with warnings.catch_warnings(record=True) as caught:
        quiet.install()  # what importing dpo_lightning does; pytest resets the filters around each test
        L.Trainer(logger=True, default_root_dir=tmp_path, enable_progress_bar=False)
        warnings.warn("a warning of the user's own", UserWarning)
    assert [str(w.message) for w in caught] == ["a warning of the user's own"]
