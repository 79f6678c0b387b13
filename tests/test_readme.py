"""What the README shows runs as written: its Python section, and the seed's recipe `configs/gpt2-hh.yaml`.

The Python block is read from README.md and executed in a temp folder holding a link `dpo_lightning` to the
package (the block names the shipped `dpo_lightning/assets/sort-tiny` by its path from the repository root),
with one substitution: `max_steps=100` becomes `max_steps=30`, enough for the before/after it prints to show DPO
learning. The config runs through the CLI with a tiny model and data in a temp folder, on a train split shorter
than its validation interval. No network.
"""

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import rows
from datasets import Dataset

from dpo_lightning.cli.main import cli_main

ROOT = Path(__file__).resolve().parents[1]


def python_section() -> str:
    """The first ```python block under README.md's "## Use it from Python"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_section_runs_as_written_and_shows_dpo_learning(tmp_path, monkeypatch, capsys):
    # Its 4 pairs and 1,000 steps left held-out accuracy at 0.5: the before/after showed nothing learned.
    code = python_section()
    assert code.count("max_steps=100,") == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dpo_lightning").symlink_to(ROOT / "dpo_lightning")
    namespace = {}
    exec(compile(code.replace("max_steps=100,", "max_steps=30,"), "README.md", "exec"), namespace)
    trainer, dpo, model_ref = namespace["trainer"], namespace["dpo"], namespace["model_ref"]
    assert trainer.global_step == 30
    assert dpo.reference is model_ref and not any(p.requires_grad for p in model_ref.parameters())
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines() if line.startswith("val/"))
    before_after = {name: [float(v) for v in value.split(" -> ")] for name, value in printed.items()}
    # Before, the policy is the reference: loss ln 2, ties (accuracy 0.5), margin 0; after 30 steps it has learned.
    assert before_after["val/loss"][0] == pytest.approx(math.log(2), abs=1e-3) and before_after["val/loss"][1] < 0.6
    assert before_after["val/rewards/accuracies"] == [0.5, pytest.approx(1.0, abs=0.2)]
    assert before_after["val/rewards/margins"][0] == 0 and before_after["val/rewards/margins"][1] > 0.1


def test_gpt2_hh_config_validates_across_epochs_and_keeps_the_best_accuracy_without_folders(tiny_gpt2, tmp_path,
                                                                                           monkeypatch):
    # One training batch an epoch (limit_train_batches) and a validation every 2 steps: without
    # check_val_every_n_epoch null Lightning stops at once ("val_check_interval (2) must be less than or equal
    # to the number of the training batches (1)"), as the shipped 500 did on the HH slice's 187 batches.
    # The config as shipped, but for GenerateSamples' completions: 4 new tokens instead of 64, for time.
    monkeypatch.chdir(tmp_path)
    Dataset.from_dict(rows(16)).to_json(tmp_path / "train.jsonl")
    Dataset.from_dict(rows(8)).to_json(tmp_path / "val.jsonl")
    config = yaml.safe_load((ROOT / "configs" / "gpt2-hh.yaml").read_text())
    (samples,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("GenerateSamples")]
    samples["init_args"]["max_new_tokens"] = 4
    (tmp_path / "gpt2-hh.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", "gpt2-hh.yaml",
                    f"--model.model_name_or_path={tiny_gpt2}", "--data.dataset=train.jsonl",
                    "--data.eval_dataset=val.jsonl", "--data.eval_split=null", "--data.max_length=48",
                    "--data.max_prompt_length=24", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                    "--trainer.limit_train_batches=1", "--trainer.precision=32", "--trainer.enable_progress_bar=false",
                    "--model.learning_rate=1e-2", "--model.warmup_steps=0", "--model.optimizer=adamw"])
    run = Path(cli.trainer.log_dir)
    with open(run / "metrics.csv") as f:
        accuracies = {int(r["step"]): float(r["val/rewards/accuracies"]) for r in csv.DictReader(f)
                      if r["val/rewards/accuracies"]}
    assert sorted(accuracies) == [0, 1, 3]  # before training (ValidationSummary), after steps 2 and 4 (at step - 1)
    del accuracies[0]  # the sanity check saves no checkpoint
    files = sorted(p.relative_to(run / "checkpoints").as_posix() for p in (run / "checkpoints").rglob("*")
                   if p.is_file())
    best = max(accuracies, key=lambda s: (accuracies[s], -s))  # ties keep the first
    assert files == sorted([f"best-step={best + 1}-accuracy={accuracies[best]:.4f}.ckpt", "last.ckpt"])
    assert torch.load(run / "checkpoints" / files[0], weights_only=True)["global_step"] == best + 1
    (kept,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert kept["init_args"]["monitor"] == "val/rewards/accuracies"
