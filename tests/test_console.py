"""A newcomer's first run: `dpo-lightning fit --config .../configs/quickstart.yaml` from another directory.

The console script runs as a user runs it (a subprocess, from a temp folder, the config by absolute
path), and its whole output is read back: it must print the validation table and none of the lines
that made the first run look broken (issue 16). Model and tokenizer names that are neither a folder nor
a hub id get our message. Only committed assets; no network.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_lightning.utils.tokenizers import load_tokenizer
from dpo_lightning.utils.locate import PACKAGE, model_source, shipped
from dpo_lightning.training.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
BROKEN_LOOKING = ["Epoch 0/-2", "/-2 ", "v_num", "Total FLOPs", "isinstance(treespec, LeafSpec)",
                  "is_gradient_checkpointing", "Repo id must be in the form", "Tip: For seamless",
                  "LightningCLI's args parameter", "Traceback",
                  "Loading weights", "Writing model shards"]  # transformers' bar per model loaded or saved


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> str:
    """The console of a 30-step quickstart run started from an empty folder outside the repository."""
    cwd = tmp_path_factory.mktemp("elsewhere")
    script = Path(sys.executable).parent / "dpo-lightning"
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps the bar's fields to the terminal width
    done = subprocess.run([str(script), "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                           "--trainer.max_steps=30"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (cwd / "runs" / "quickstart" / "version_0" / "hf_model" / "model.safetensors").is_file()
    return done.stdout + done.stderr


def test_the_model_card_lists_settings_only(first_run, tmp_path_factory):
    # LightningCLI adds `_instantiator` to the module's hyperparameters; the card listed it as a setting.
    card = next(tmp_path_factory.getbasetemp().glob("elsewhere*/runs/quickstart/version_0/hf_model/README.md"))
    assert "_instantiator" not in card.read_text() and "beta: 0.1" in card.read_text()


def test_first_run_prints_the_validation_table_and_no_broken_looking_line(first_run):
    assert [line for line in first_run.splitlines() if any(bad in line for bad in BROKEN_LOOKING)] == []
    table = first_run[first_run.index("\nvalidation "):].splitlines()
    assert table[1].split() == ["validation", "step", "loss", "rewards/accuracies", "rewards/margins",
                                "reward/greedy"]
    step0 = table[2].split()
    assert step0[:4] == ["0", "0.6931", "0.5000", "0.0000"]  # step 0: policy == reference
    assert 0 <= float(step0[4]) < 0.1  # the starting model sorts few held-out prompts greedily (README: 3%)
    assert table[3].split()[0] == "25"
    assert "step" in first_run and "30/30" in first_run  # the bar counts optimizer steps out of max_steps


def test_first_run_ends_with_its_headline_what_it_wrote_and_what_next(first_run):
    end = first_run[first_run.index("\nvalidation "):]
    rows = [line.split() for line in end.splitlines()[2:4]]  # the step-0 and step-25 rows: validated every 25
    assert f"[dpo_lightning] step 0 -> 25: reward accuracy {rows[0][2]} -> {rows[1][2]}, " in end
    assert f", greedy reward (solve rate) {rows[0][4]} -> {rows[1][4]}\n" in end  # the quickstart's GreedyReward
    # 30 steps, validated every 25: the headline's last numbers are step 25's, and the summary says so.
    assert "[dpo_lightning] the run trained to step 30, after its last validation (step 25)" in end
    assert "[dpo_lightning] this run wrote, in runs/quickstart/version_0/:" in end
    assert "\n  hf_model/ " in end and "\n  metrics.csv " in end
    assert "\n  dpo-lightning plot runs/quickstart/version_0\n" in end


def test_first_run_does_not_warn_about_modules_in_eval_mode(first_run):
    assert "module(s) in eval mode" not in first_run


def test_shipped_assets_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped("dpo_lightning/assets/sort-tiny") == str(PACKAGE / "assets" / "sort-tiny")
    assert shipped("dpo_lightning/assets/sort-tiny/train.jsonl") == str(PACKAGE / "assets" / "sort-tiny" / "train.jsonl")
    (tmp_path / "dpo_lightning" / "mine").mkdir(parents=True)
    assert shipped("dpo_lightning/mine") == "dpo_lightning/mine"  # a folder that exists here wins
    assert model_source("gpt2") == "gpt2" and model_source("org/some-model") == "org/some-model"  # hub ids


@pytest.mark.parametrize("load, what", [(lambda name: load_causal_lm(name, None, False), "--model.model_name_or_path"),
                                        (load_tokenizer, "the tokenizer")])
def test_a_name_that_is_neither_a_folder_nor_a_hub_id_gets_our_message(load, what, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load("runs/v0/hf_model")  # a relative folder that is not here: the hub client would say "Repo id must..."
    message = str(error.value)
    assert message.startswith(f"not found: runs/v0/hf_model (working directory {tmp_path})")
    assert f"For {what}, pass" in message and "a hub id such as 'gpt2'" in message  # the setting that named it
    assert "dpo_lightning/assets/sort-tiny" in message  # what to pass instead
