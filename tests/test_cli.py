"""The `dpo-lightning` command: every file in configs/ parses, and `fit` runs from a config.

Parsing (`--print_config`) instantiates nothing, so the hub recipe is checked without the hub; the
`fit` runs use a tiny model and data in temp folders.
"""

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import rows
from datasets import Dataset

from dpo_lightning.cli.main import cli_main, main

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


@pytest.mark.parametrize("typo, where", [(["--model.betta", "0.2"], "flag"), ({"data": {"max_lenght": 12}}, "yaml"),
                                         (["--trainr.max_steps=3"], "section"),
                                         (["--model.online.num_sampels", "3"], "online flag"),
                                         ({"model": {"online": {"num_sampels": 3}}}, "online yaml")])
def test_a_typo_in_a_key_is_one_line_naming_it_its_section_and_the_closest_key(typo, where, tmp_path, capsys):
    shipped = "online_quickstart.yaml" if where.startswith("online") else "quickstart.yaml"
    args = ["fit", "--config", str(ROOT / "configs" / shipped)]
    if where.endswith("yaml"):  # a second config file, as a user layers one over a shipped config
        (tmp_path / "mine.yaml").write_text(yaml.safe_dump(typo))
        typo = ["--config", str(tmp_path / "mine.yaml")]
    with pytest.raises(SystemExit) as exit_, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LightningCLI's own warning of args given from Python, not the user's
        cli_main(args + typo)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = {"flag": "unknown key 'betta' in the model section (--model.betta); did you mean 'beta' (--model.beta)?",
                "yaml": "unknown key 'max_lenght' in the data section (--data.max_lenght); did you mean 'max_length' "
                        "(--data.max_length)?",
                "section": "unknown key 'trainr.max_steps' (--trainr.max_steps); did you mean --trainer.max_steps?"}
    # A typed section (online DPO's settings, `OnlineConfig`), on the command line and in a file alike.
    expected["online flag"] = expected["online yaml"] = (
        "unknown key 'num_sampels' in the model.online section (--model.online.num_sampels); did you mean "
        "'num_samples' (--model.online.num_samples)?")
    assert err == [f"error: {expected[where]} `dpo-lightning fit --help` lists every key"]  # no usage above it


@pytest.mark.parametrize("name, text", [("one.jsonl", '{"prompt": "p", "chosen": " a", "rejected": " b"}\n'),
                                        ("rows.json", '[{"prompt": "p", "chosen": " a", "rejected": " b"}]')])
def test_a_data_file_named_on_the_command_line_stays_a_path(name, text, tmp_path, monkeypatch, capsys):
    # jsonargparse read a one-row .jsonl into a dict (then "a dict of columns needs one list per column") and a
    # .json array into in-memory rows; rows written inline in a YAML stay rows.
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["fit", "--model.model_name_or_path=m", f"--data.dataset={name}", f"--data.eval_dataset={name}",
                  "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    assert printed["dataset"] == printed["eval_dataset"] == name


def test_console_script_exits_zero_after_a_run(tmp_path):
    # The installed `dpo-lightning` wraps main() in sys.exit(): any return value but None would exit 1.
    script = Path(sys.executable).parent / "dpo-lightning"
    done = subprocess.run([str(script), "fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps=1",
                           "--trainer.limit_val_batches=1", f"--trainer.logger.init_args.save_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def test_inspect_data_prints_the_summary_and_rows_token_by_token(capsys, caplog, monkeypatch):
    from dpo_lightning.cli.main import main

    monkeypatch.chdir(ROOT)
    main(["inspect-data", "--config", "configs/quickstart.yaml", "--rows", "1"])
    out = capsys.readouterr().out
    assert "train: 2000 rows, 2000 kept, dropped {none}" in out and "val: 256 rows, 256 kept" in out
    # Once each: setup's own summary line ("[dpo_lightning] train data: 2000 rows, ...") repeated it.
    console = out + "\n".join(caplog.messages)
    assert console.count("2000 rows, 2000 kept") == 1 and console.count("256 rows, 256 kept") == 1
    # The first training pair, prompt masked in brackets; every character is one token of the tokenizer.
    assert "   chosen: [s|o|r|t| |j|m|b|e|:]  |b|e|j|m|<|endoftext|>" in out


def test_inspect_data_takes_fits_configs_and_flags_and_warns_of_a_large_cut(tmp_path, capsys, monkeypatch):
    # It read one YAML with yaml.safe_load: two --config kept the last (then a bare TypeError), flags were refused.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({"data": {"max_prompt_length": 8}}))
    main(["inspect-data", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", "short.yaml",
          "--data.max_length", "12", "--rows", "1"])
    out = capsys.readouterr().out
    assert "train: 2000 rows, 2000 kept, dropped {none}, 2000 truncated to max_length 12" in out
    assert "12 / 12 / 12 as trained" in out  # every pair cut to max_length, as fit would train it
    assert "warning: 2000 of 2000 train rows (100%) are cut to max_length 12" in out
    prompt = out.split("chosen: [")[1].split("]")[0].split("|")
    assert len(prompt) == 8  # the second config's max_prompt_length, over the first's


def test_inspect_data_of_an_online_config_shows_the_prompts_it_trains_on(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["inspect-data", "--config", "configs/online_quickstart.yaml", "--rows", "1"])
    out = capsys.readouterr().out
    train = out[:out.index("\nval: ")]
    assert "; schema: prompts" in train and "chosen:" not in train and "rejected:" not in train
    assert "--- row 0: prompt 10 tokens, completed by the policy during training\n   prompt: [s|o|r|t| |j|m|b|e|:]" \
        in train
    assert "   chosen: [s|o|r|t|" in out[out.index("\nval: "):]  # validation reads pairs, online too


def imported_modules(*args: str) -> set[str]:
    """Top-level packages a fresh `python -m dpo_lightning.cli.main ARGS` imports (`-X importtime` lists each on stderr)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dpo_lightning.cli.main", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("args", [["--help"], ["from-trl", "TRL_ARGS"]], ids=["help", "from-trl"])
def test_help_and_from_trl_import_neither_torch_nor_transformers(args, tmp_path):
    # Importing them took 12-15 s before anything was printed (issue 22); these commands need neither.
    trl_args = tmp_path / "args.json"
    trl_args.write_text('{"beta": 0.2, "loss_type": "ipo", "max_steps": 10}')
    heavy = {"torch", "transformers", "lightning", "datasets", "peft"}
    assert imported_modules(*[str(trl_args) if a == "TRL_ARGS" else a for a in args]) & heavy == set()


def test_from_trl_reads_the_signatures_and_losses_the_imports_have():
    # from-trl reads them from the source files (so that it imports nothing heavy): the same sets as imported.
    import inspect

    import lightning as L

    from dpo_lightning import LOSSES, DPOModule, PreferenceDataModule
    from dpo_lightning.tools.migrate import PACKAGE, init_arguments, loss_names, loss_options
    from dpo_lightning.training.losses import LOSS_ARGS

    assert init_arguments(PACKAGE / "training" / "module.py", "DPOModule") == set(inspect.signature(DPOModule).parameters)
    assert init_arguments(PACKAGE / "data" / "datamodule.py", "PreferenceDataModule") == set(
        inspect.signature(PreferenceDataModule).parameters)
    lightning_trainer = Path(inspect.getfile(L.Trainer))
    assert init_arguments(lightning_trainer, "Trainer") == set(inspect.signature(L.Trainer).parameters)
    assert loss_names() == set(LOSSES)
    assert loss_options() == {name: set(options) for name, options in LOSS_ARGS.items()}


def test_help_lists_fit_and_validate_and_no_subcommand_the_module_cannot_run(capsys):
    from dpo_lightning.cli.main import main

    main(["--help"])
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert {"fit", "validate", "export", "plot", "from-trl", "inspect-data"} <= listed
    assert not {"test", "predict"} & listed  # the module has no test_step / predict_step
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--config", "configs/quickstart.yaml"])
    assert "dpo-lightning validate" in str(exit_.value.code) and "--data.eval_dataset" in str(exit_.value.code)
    with pytest.raises(SystemExit) as exit_:  # LightningCLI itself no longer offers them
        cli_main(["test", "--config", str(ROOT / "configs" / "quickstart.yaml")])
    assert exit_.value.code != 0 and "invalid choice" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("name, closest", [("fitt", "fit"), ("inspect", "inspect-data"), ("train", None)])
def test_an_unknown_subcommand_lists_every_subcommand(name, closest):
    # LightningCLI answered with its own two: "invalid choice 'fitt' (choose from fit, validate)".
    from dpo_lightning.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main([name, "--config", "configs/quickstart.yaml"])
    message = str(exit_.value.code)
    assert message.startswith(f"dpo-lightning: no `{name}` subcommand")
    assert "fit, validate, export, plot, from-trl, inspect-data" in message
    assert (f"did you mean `{closest}`?" in message) if closest else "did you mean" not in message


def test_validate_of_a_checkpoint_prepares_only_its_split_at_the_checkpoints_step(tiny_llama, tmp_path, capfd,
                                                                                 caplog, monkeypatch):
    # It prepared the train split too, warned that ModelCheckpoint's dirpath changed, and logged step 0.
    monkeypatch.chdir(tmp_path)
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    Dataset.from_dict(rows(16)).to_json(train)
    Dataset.from_dict(rows(4)).to_json(val)
    common = [f"--model.model_name_or_path={tiny_llama}", f"--data.dataset={train}", f"--data.eval_dataset={val}",
              "--data.max_length=48", "--data.max_prompt_length=24", "--data.batch_size=4",
              "--trainer.enable_progress_bar=false", "--trainer.logger.init_args.name=run"]
    cli_main(["fit", *common, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
              "--trainer.log_every_n_steps=1", "--trainer.check_val_every_n_epoch=null",
              "--trainer.num_sanity_val_steps=0"])
    checkpoint = next((tmp_path / "runs" / "run" / "version_0" / "checkpoints").glob("*.ckpt"))
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main(["validate", *common, f"--ckpt_path={checkpoint}"])
    summaries = [m.split(":")[0] for m in caplog.messages if m.startswith("[dpo_lightning]") and " data: " in m]
    assert summaries == ["[dpo_lightning] eval data"] and cli.datamodule.train_data is None
    assert [str(w.message) for w in caught if "dirpath" in str(w.message)] == []

    def val_rows(version: str) -> dict[str, dict[str, str]]:
        with open(tmp_path / "runs" / "run" / version / "metrics.csv") as f:
            return {row["step"]: row for row in csv.DictReader(f) if row.get("val/loss")}

    # The fit's validation after 4 steps sits on row 3 (Lightning logs after step N on row N - 1); the
    # checkpoint's validation lands there too, with the same values (same weights, same pairs).
    fitted, validated = val_rows("version_0"), val_rows("version_1")
    assert list(validated) == ["3"]
    assert float(validated["3"]["val/loss"]) == pytest.approx(float(fitted["3"]["val/loss"]), rel=1e-5)

    from dpo_lightning.cli.main import main

    capfd.readouterr()
    main(["plot", str(tmp_path / "runs" / "run")])  # the newest run that trained, not the one-point validate
    assert f"from {tmp_path / 'runs' / 'run' / 'version_0' / 'metrics.csv'}" in capfd.readouterr().out
