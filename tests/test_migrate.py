"""`dpo-lightning from-trl`: TRL `DPOConfig` / `TrainingArguments` names to our LightningCLI config.

The seed tutorial's TRL arguments must convert to the recipe written by hand in configs/gpt2-hh.yaml,
the output must parse through the CLI, units must convert (batches vs optimizer steps, warm-up shares),
and no input key may vanish: each is mapped, same as ours, or listed as not carried over. Parsing only, but for
a default TRL `DPOConfig` converted and fitted a step with a tiny model (conftest.py); no network.
"""

import json
import re
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
    # TRL 1.16 has no prompt limit: it cuts the whole sequence to max_length, keeping its start. Our default prompt
    # limit (128) would cut a long prompt's question away: the converted config lets a prompt take all but one.
    theirs = trl.DPOConfig(output_dir="out", use_cpu=True)
    assert not hasattr(theirs, "max_prompt_length")
    assert cli.datamodule.hparams.max_prompt_length == theirs.max_length - 1
    assert cli.datamodule.hparams.truncation_mode == theirs.truncation_mode == "keep_start"


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


def test_a_trl_dpo_recipe_with_peft_gets_trls_lora_defaults_and_reports_them():
    # The `trl dpo` script builds LoraConfig from ModelConfig: r 16, alpha 32, dropout 0.05 where the recipe is
    # silent; the converted run must train the same adapter. disable_dropout false keeps TRL's LoRA dropout.
    trl = pytest.importorskip("trl")
    ours = from_trl({"model_name_or_path": "m", "dataset_name": "d", "use_peft": True, "disable_dropout": False})
    theirs = trl.ModelConfig(use_peft=True)
    assert {k: ours.config["model"][k] for k in ("lora_r", "lora_alpha", "lora_dropout")} == \
        {"lora_r": theirs.lora_r, "lora_alpha": theirs.lora_alpha, "lora_dropout": theirs.lora_dropout}
    assert "lora_target_modules" not in ours.config["model"]  # None in both: peft's default for the architecture
    assert theirs.lora_target_modules is None
    reported = {key for key, _, _ in ours.defaults}
    assert {"lora_r", "lora_alpha", "lora_dropout"} <= reported
    # TRL's default disable_dropout zeroes the LoRA dropout too (trl.trainer.utils.disable_dropout_in_model).
    assert from_trl({"use_peft": True}).config["model"]["lora_dropout"] == 0.0


def test_a_sparse_trl_recipe_gets_trls_own_defaults_written_out_and_reported():
    # TRL's DPOConfig overrides transformers': logging every 10 steps, gradient checkpointing, bf16 unless fp16;
    # its eval batch is 8 whatever the train batch (ours follows the train batch).
    trl = pytest.importorskip("trl")
    theirs = trl.DPOConfig(output_dir="out", use_cpu=True)
    migration = from_trl({"output_dir": "out", "per_device_train_batch_size": 2})
    config = migration.config
    assert config["trainer"]["log_every_n_steps"] == theirs.logging_steps
    assert config["model"]["gradient_checkpointing"] is theirs.gradient_checkpointing is True
    assert theirs.bf16 and config["trainer"]["precision"] == "bf16-mixed"
    assert config["data"]["eval_batch_size"] == theirs.per_device_eval_batch_size
    reported = {key for key, _, _ in migration.defaults}
    assert {"logging_steps", "gradient_checkpointing", "bf16", "per_device_eval_batch_size"} <= reported
    assert "eval_batch_size" not in from_trl({}).config["data"]  # train batch 8: ours is 8 too
    assert "precision" not in from_trl({"fp16": False, "bf16": False}).config["trainer"]


@pytest.mark.parametrize("key, value, max_steps, where, expected", [
    # transformers (TrainerState.compute_steps): a value below 1 is a share of max_steps, rounded up.
    ("logging_steps", 0.05, 1000, ("trainer", "log_every_n_steps"), 50),
    ("logging_steps", 0.013, 100, ("trainer", "log_every_n_steps"), 2),
    ("save_steps", 0.5, 30, ("checkpoint", "every_n_train_steps"), 15),
    ("eval_steps", 0.25, 40, ("trainer", "val_check_interval"), 10),
])
def test_step_counts_given_as_a_share_of_max_steps_become_steps(key, value, max_steps, where, expected):
    args = {key: value, "max_steps": max_steps, **({"eval_strategy": "steps"} if key == "eval_steps" else {})}
    config = from_trl(args).config
    if where[0] == "checkpoint":
        [checkpoint] = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert checkpoint["init_args"][where[1]] == expected
    else:
        assert config[where[0]][where[1]] == expected


@pytest.mark.parametrize("key", ["logging_steps", "save_steps", "eval_steps"])
def test_a_share_of_steps_without_max_steps_is_not_carried_over(key):
    # A run by epochs: transformers takes max_steps from the data's length, which a converter cannot know.
    migration = from_trl({key: 0.5, "num_train_epochs": 2, "eval_strategy": "steps"})
    assert listed(migration)[key] == "not_carried"
    written = yaml.safe_load(migration.to_yaml())
    assert written["trainer"].get("log_every_n_steps") != 0.5 and written["trainer"].get("val_check_interval") != 0
    assert all("ModelCheckpoint" not in c["class_path"] for c in written["trainer"]["callbacks"])


def test_trls_aot_unpaired_is_our_aot_pair():
    # TRL 1.16 renamed its unpaired AOT loss (TRL 0.x: aot_pair, ours) to aot_unpaired; each other name is ours.
    trl = pytest.importorskip("trl")
    names = set(re.findall(r"`'(\w+)'`", trl.DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
    assert "aot_unpaired" in names
    assert from_trl({"loss_type": "aot_unpaired"}).config["model"]["loss_type"] == "aot_pair"
    assert from_trl({"loss_type": ["sigmoid", "aot_unpaired"]}).config["model"]["loss_type"] == ["sigmoid", "aot_pair"]
    for name in names - {"aot_unpaired"}:
        assert from_trl({"loss_type": name}).config["model"]["loss_type"] == name, name


def test_trls_seed_and_data_seed_land_where_they_decide_the_same_things():
    # TRL: `seed` seeds the run, `data_seed` the data order (default: seed). Here: seed_everything and data.seed.
    config = from_trl({"seed": 5, "data_seed": 3}).config
    assert config["seed_everything"] == 5 and config["data"]["seed"] == 3
    assert "seed" not in from_trl({"seed": 5, "data_seed": None}).config["data"]  # the order follows seed_everything
