"""The `dpo-lightning` command: every file in configs/ parses, and `fit` runs from a config.

Parsing (`--print_config`) instantiates nothing, so the hub recipe is checked without the hub; the
`fit` runs use a tiny model and data in temp folders.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import rows
from datasets import Dataset

from dpo_lightning.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model_name_or_path"] and printed["data"]["dataset"]


def test_fit_from_the_command_line_names_the_model_once(tiny_llama, tmp_path):
    train = tmp_path / "train.jsonl"
    Dataset.from_dict(rows(8)).to_json(train)
    cli = cli_main(["fit", f"--model.model_name_or_path={tiny_llama}", f"--data.dataset={train}",
                f"--data.eval_dataset={train}", "--data.max_length=48", "--data.max_prompt_length=24",
                "--data.batch_size=4", "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.tokenizer.name_or_path == tiny_llama  # no --data.tokenizer: the model's
    metrics = (Path(cli.trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/loss", "val/rewards/accuracies", "val/logits/chosen"} <= set(metrics)


def test_a_bad_flag_value_fails_before_any_loading(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.model_name_or_path=x", "--data.dataset=y", "--model.loss_type=nope"])
    assert "loss_type" in capsys.readouterr().err


def test_console_script_exits_zero_after_a_run(tmp_path):
    # The installed `dpo-lightning` wraps main() in sys.exit(): any return value but None would exit 1.
    script = Path(sys.executable).parent / "dpo-lightning"
    done = subprocess.run([str(script), "fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps=1",
                           "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_inspect_data_prints_the_summary_and_rows_token_by_token(capsys, monkeypatch):
    from dpo_lightning.cli import main

    monkeypatch.chdir(ROOT)
    main(["inspect-data", "--config", "configs/quickstart.yaml", "--rows", "1"])
    out = capsys.readouterr().out
    assert "train: 2000 rows, 2000 kept, dropped {none}" in out and "val: 256 rows, 256 kept" in out
    # The first training pair, prompt masked in brackets; every character is one token of the tokenizer.
    assert "   chosen: [s|o|r|t| |j|m|b|e|:]  |b|e|j|m|<|endoftext|>" in out
