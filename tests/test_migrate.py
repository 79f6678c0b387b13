"""`dpo-lightning from-trl`: TRL `DPOConfig` / `TrainingArguments` names to our LightningCLI config.

The seed tutorial's TRL arguments must convert to the recipe written by hand in configs/gpt2-hh.yaml,
the output must parse through the CLI, units must convert (batches vs optimizer steps, warm-up shares),
and no input key may vanish: each is mapped, same as ours, or listed as not carried over. Parsing only, but for
a default TRL `DPOConfig` converted and fitted a step with a tiny model (conftest.py); no network.
"""

import json
from pathlib import Path

from conftest import rows
from datasets import Dataset

import pytest
import yaml

from dpo_lightning.cli.main import cli_main, main
from dpo_lightning.tools.migrate import from_trl

ROOT = Path(__file__).resolve().parents[1]
# The seed tutorial: DPOTrainer(model="gpt2", ...) on Anthropic HH with these DPOConfig arguments (TRL 0.2x names).
SEED_ARGS = {"model_name_or_path": "gpt2", "dataset_name": "Anthropic/hh-rlhf", "output_dir": "dpo-gpt2",
             "beta": 0.1, "per_device_train_batch_size": 8, "max_length": 512, "max_prompt_length": 128,
             "max_target_length": 128, "bf16": True, "optim": "rmsprop", "learning_rate": 5e-7, "warmup_steps": 150,
             "max_steps": 1000, "eval_steps": 500, "logging_steps": 5, "generate_during_eval": True,
             "evaluation_strategy": "steps", "remove_unused_columns": False}


def listed(migration) -> dict[str, str]:
    """Every input key the migration accounts for, with the list it is in."""
    lists = {"mapped": migration.mapped, "same": migration.same, "not_carried": migration.not_carried}
    return {key: name for name, items in lists.items() for key, _, _ in items}


def test_seed_tutorial_arguments_give_the_hand_written_recipe():
    config = from_trl(SEED_ARGS).config
    recipe = yaml.safe_load((ROOT / "configs" / "gpt2-hh.yaml").read_text())
    for section, keys in {"model": ["model_name_or_path", "beta", "optimizer", "learning_rate", "warmup_steps"],
                          "data": ["dataset", "eval_split", "batch_size", "max_length", "max_prompt_length"],
                          "trainer": ["precision", "max_steps", "val_check_interval", "log_every_n_steps"]}.items():
        assert {k: config[section][k] for k in keys} == {k: recipe[section][k] for k in keys}, section
    # What transformers did without being asked, written out: linear decay and clipping at 1.0.
    assert config["model"]["lr_scheduler_type"] == "linear" and config["trainer"]["gradient_clip_val"] == 1.0
    assert config["trainer"]["check_val_every_n_epoch"] is None  # eval_steps count across epochs
    assert {"class_path": "dpo_lightning.callbacks.GenerateSamples"} in config["trainer"]["callbacks"]


def test_every_key_is_accounted_for_and_the_unsupported_are_in_the_yaml():
    args = {**SEED_ARGS, "sync_ref_model": True, "optim": "adafactor", "lr_scheduler_type": "polynomial",
            "my_own_flag": 3, "adam_beta1": 0.9, "rpo_alpha": 1.0, "loss_type": "ipo", "router_aux_loss_coef": 0.01}
    migration = from_trl(args)
    where = listed(migration)
    assert set(args) - {"evaluation_strategy"} <= set(where) and "eval_strategy" in where  # the 0.2x name, renamed
    for key in ("max_target_length", "sync_ref_model", "optim", "lr_scheduler_type", "my_own_flag"):
        assert where[key] == "not_carried", key
    assert where["adam_beta1"] == "same" and where["rpo_alpha"] == "mapped" and where["loss_type"] == "mapped"
    assert where["router_aux_loss_coef"] == "mapped" and migration.config["model"]["router_aux_loss_coef"] == 0.01
    comments = [line for line in migration.to_yaml().splitlines() if line.startswith("#")]
    not_carried = comments.index("# NOT CARRIED OVER, check each:")
    for key in ("max_target_length", "sync_ref_model", "optim", "lr_scheduler_type", "my_own_flag"):
        assert any(line.startswith(f"#   {key}: ") for line in comments[not_carried:]), key


@pytest.mark.parametrize("args, section, key, value", [
    ({"gradient_accumulation_steps": 4, "eval_strategy": "steps", "eval_steps": 100}, "trainer", "val_check_interval", 400),
    ({"warmup_ratio": 0.1, "max_steps": 1000}, "model", "warmup_steps", 100),
    ({"warmup_steps": 0.05, "max_steps": 1000}, "model", "warmup_steps", 50),  # transformers 5: a float < 1 is a share
    ({"eval_strategy": "no"}, "trainer", "limit_val_batches", 0),
    ({}, "trainer", "limit_val_batches", 0),  # transformers' default: no evaluation
    ({}, "trainer", "max_epochs", 3),
    ({"fp16": True}, "trainer", "precision", "16-mixed"),
    ({"optim": "adamw_torch_fused"}, "model", "optimizer", "adamw"),
    ({"lr_scheduler_type": "cosine"}, "model", "lr_scheduler_type", "cosine"),
])
def test_units_and_defaults_convert(args, section, key, value):
    assert from_trl(args).config[section][key] == value


def test_command_writes_a_config_the_cli_parses(tmp_path, capsys):
    (tmp_path / "args.json").write_text(json.dumps(SEED_ARGS))
    main(["from-trl", str(tmp_path / "args.json"), "--out", str(tmp_path / "dpo.yaml")])
    assert "max_target_length" in capsys.readouterr().err  # the report, on stderr
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--config", str(tmp_path / "dpo.yaml"), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["optimizer"] == "rmsprop" and printed["trainer"]["precision"] == "bf16-mixed"


def test_a_default_trl_dpo_config_converts_to_a_config_that_fits(tiny_llama, tmp_path, monkeypatch):
    # TRL's defaults for options its loss ignores (discopop_tau 0.05 with loss_type sigmoid) were carried over,
    # and fit refused them: "--model.discopop_tau is set but loss_type ['sigmoid'] ignores it".
    trl = pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "args.json").write_text(trl.DPOConfig(output_dir="out", use_cpu=True).to_json_string())
    main(["from-trl", "args.json", "--out", "mine.yaml"])
    Dataset.from_dict(rows(8)).to_json(tmp_path / "train.jsonl")
    cli = cli_main(["fit", "--config", "mine.yaml", f"--model.model_name_or_path={tiny_llama}",
                    "--data.dataset=train.jsonl", "--trainer.max_steps=1", "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 1


@pytest.mark.parametrize("loss_type, option, value, where", [
    ("sigmoid", "discopop_tau", 0.05, "same"),  # TRL's default, which its sigmoid loss ignores too
    ("ipo", "f_divergence_type", "reverse_kl", "same"),
    ("ipo", "f_alpha_divergence_coef", 1.0, "same"),
    ("ipo", "label_smoothing", 0.0, "same"),
    ("ipo", "f_divergence_type", "js_divergence", "not_carried"),  # a choice that ipo cannot take here
    ("sigmoid", "discopop_tau", 0.2, "not_carried"),
    ("discopop", "discopop_tau", 0.05, "mapped"),  # a loss that takes it: carried, default or not
    ("sigmoid", "f_divergence_type", "js_divergence", "mapped"),
])
def test_a_loss_option_the_chosen_loss_does_not_take_is_never_carried_into_the_config(loss_type, option, value,
                                                                                      where):
    migration = from_trl({"loss_type": loss_type, option: value})
    assert listed(migration)[option] == where
    assert (option in migration.config["model"]) == (where == "mapped")


def test_push_to_hub_is_listed_as_not_carried_over():
    where = listed(from_trl({"push_to_hub": True, "hub_model_id": "me/model"}))
    assert where["push_to_hub"] == where["hub_model_id"] == "not_carried"
    assert listed(from_trl({"push_to_hub": False}))["push_to_hub"] == "same"
