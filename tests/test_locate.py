"""Paths named in a config (utils/locate.py): a path that is not there fails at once with our message, never
through the hub; a `dpo_lightning/...` path is found in the installed package from any directory, from Python and
the command line alike.

The hub is made unreachable in every test here (offline mode, and a socket that records and refuses any
connection): a name sent to the hub would show up as a recorded call. Tiny data and models from conftest.py.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import ascii_tokenizer

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.cli.main import main
from dpo_lightning.utils.locate import PACKAGE, located

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = PACKAGE / "assets" / "sort-tiny"


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty working directory and an unreachable hub; yields the list of attempted connections (host, port)."""
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def connect(self, address):
        calls.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    for name in ("hf_hub_download", "snapshot_download"):  # a call the offline mode would answer from a cache
        monkeypatch.setattr(huggingface_hub, name, lambda *a, _name=name, **k: calls.append(_name))
    yield calls
    assert calls == [], "a local path was sent to the hub"


def lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


PATHS = ["data/mytrain.jsonl", "./mytrain.jsonl", "../elsewhere/mytrain.jsonl", "/nowhere/mytrain.jsonl",
         "~/nowhere-dpo-lightning/mytrain.jsonl", "data/2024/train", "data/*.jsonl", "mytrain.parquet"]


@pytest.mark.parametrize("name", PATHS)
def test_a_data_path_that_is_not_there_fails_at_construction_naming_it_and_the_working_directory(name, no_hub,
                                                                                                 tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        PreferenceDataModule(dataset=name, tokenizer=ascii_tokenizer())
    message = str(error.value)
    assert message.startswith(f"not found: {name} (working directory {tmp_path})")
    assert "--data.dataset" in message and "'dpo_lightning/assets/sort-tiny/train.jsonl'" in message  # instead


def test_an_eval_path_that_is_not_there_is_named_as_the_eval_dataset(no_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found: \./val\.jsonl .*--data\.eval_dataset"):
        PreferenceDataModule(dataset=str(SHIPPED / "train.jsonl"), eval_dataset="./val.jsonl",
                             tokenizer=ascii_tokenizer())


def test_a_typo_names_the_closest_file_in_its_folder(no_hub, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "my_train.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(FileNotFoundError) as error:
        PreferenceDataModule(dataset="data/mytrain.jsonl", tokenizer=ascii_tokenizer())
    assert f"(working directory {tmp_path}). Did you mean data/my_train.jsonl? For --data.dataset, pass" in \
        str(error.value)


@pytest.mark.parametrize("name", ["models/my-model", "./my-model", "runs/v0/hf_model", "~/nowhere-dpo-lightning/m"])
def test_a_model_or_tokenizer_path_that_is_not_there_fails_without_the_hub(name, no_hub, tmp_path):
    (tmp_path / "models").mkdir()  # `models/my-model` could be a hub id; with a folder `models` here it is a path
    with pytest.raises(FileNotFoundError) as error:
        DPOModule(name)
    assert str(error.value).startswith(f"not found: {name} (working directory {tmp_path})")
    assert "For --model.model_name_or_path, pass" in str(error.value) and "'gpt2'" in str(error.value)
    data = PreferenceDataModule(dataset=str(SHIPPED / "train.jsonl"), tokenizer=name)
    with pytest.raises(FileNotFoundError, match=f"not found: {name} .*the tokenizer"):
        data.setup("fit")


def test_a_reward_model_folder_that_is_not_there_is_named_as_the_reward_setting(no_hub, tmp_path):
    from dpo_lightning.online.rewards import load_reward, sort_exact

    with pytest.raises(FileNotFoundError, match=r"^not found: \./models/rm \(working directory .*For "
                                                r"--model\.online\.reward_funcs, pass a reward model's existing folder"):
        load_reward("./models/rm", "--model.online.reward_funcs")
    assert load_reward("dpo_lightning.online.rewards.sort_exact") is sort_exact  # an import path, as before


@pytest.mark.parametrize("name", ["gpt2", "org/name", "EleutherAI/gpt-neo-1.3B", "Anthropic/hh-rlhf"])
def test_a_hub_id_is_passed_on_as_it_is(name, no_hub):
    assert located(name, "--data.dataset", "data") == name and located(name, "the model") == name


def test_shipped_data_paths_and_globs_are_found_from_any_directory_in_python(no_hub, tmp_path):
    # From Python, outside the repository: the CLI's pre-pass found these, a data module built in Python did not.
    data = PreferenceDataModule(dataset="dpo_lightning/assets/sort-tiny/train.jsonl",
                                eval_dataset="dpo_lightning/assets/sort-tiny/*.jsonl", tokenizer=ascii_tokenizer(),
                                max_length=64, max_prompt_length=32)
    data.setup("fit")
    assert data.summary["train"]["rows"] == lines(SHIPPED / "train.jsonl")
    assert data.summary["val"]["rows"] == lines(SHIPPED / "train.jsonl") + lines(SHIPPED / "val.jsonl")
    listed = PreferenceDataModule(dataset=["dpo_lightning/assets/sort-tiny/val.jsonl"], tokenizer=ascii_tokenizer(),
                                  max_length=64, max_prompt_length=32)
    listed.setup("fit")
    assert listed.summary["train"]["rows"] == lines(SHIPPED / "val.jsonl")


def test_the_command_line_says_not_found_in_one_line_from_another_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "dpo_lightning.cli", "fit", "--config",
                           str(ROOT / "configs" / "quickstart.yaml"), "--data.dataset", "data/mytrain.jsonl"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"dpo-lightning: not found: data/mytrain.jsonl (working directory {tmp_path})")


def test_inspect_data_takes_the_shipped_paths_from_another_directory(no_hub, tmp_path, capsys):
    main(["inspect-data", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--rows", "0"])
    assert f"train: {lines(SHIPPED / 'train.jsonl')} rows" in capsys.readouterr().out


def test_a_missing_reference_model_is_named_as_its_setting(no_hub, tiny_llama):
    with pytest.raises(FileNotFoundError, match=r"^not found: \./models/ref .*For --model\.ref_model_name_or_path, "):
        DPOModule(tiny_llama, ref_model_name_or_path="./models/ref")


def test_pathlib_paths_from_a_notebook_are_paths_for_data_and_tokenizer(no_hub, tmp_path):
    data = PreferenceDataModule(dataset=SHIPPED / "train.jsonl", eval_dataset=[SHIPPED / "val.jsonl"],
                                tokenizer=SHIPPED, max_length=64, max_prompt_length=32)
    data.setup("fit")
    assert data.summary["train"]["rows"] == lines(SHIPPED / "train.jsonl")
    assert data.summary["val"]["rows"] == lines(SHIPPED / "val.jsonl")
    assert data.hparams.tokenizer == str(SHIPPED)  # kept as a name, as a string tokenizer is (the export finds it)
    with pytest.raises(FileNotFoundError, match=r"^not found: data/mytrain\.jsonl \(working directory"):
        PreferenceDataModule(dataset=Path("data/mytrain.jsonl"), tokenizer=ascii_tokenizer())


def test_pathlib_paths_from_a_notebook_are_paths_for_the_model_and_its_reference(no_hub, tiny_llama, other_llama):
    model = DPOModule(Path(tiny_llama), ref_model_name_or_path=Path(other_llama))
    assert isinstance(model.policy, torch.nn.Module) and isinstance(model.reference, torch.nn.Module)
    assert (model.hparams.model_name_or_path, model.hparams.ref_model_name_or_path) == (tiny_llama, other_llama)
    missing = Path(tiny_llama).parent / "no-such-model"
    with pytest.raises(FileNotFoundError, match=rf"^not found: {missing} \(working directory"):
        DPOModule(missing)


QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


@pytest.mark.parametrize("args, name, what", [
    (["from-trl", "args.json", "--out", "mine.yaml"], "args.json", "from-trl's ARGS_FILE"),
    (["export", "--ckpt_path", "runs/quickstart/version_0/checkpoints/*.ckpt", "--output_dir", "out"],
     "runs/quickstart/version_0/checkpoints/*.ckpt", "--ckpt_path"),
    (["validate", "--config", QUICKSTART, "--ckpt_path", "runs/nothere.ckpt"], "runs/nothere.ckpt", "--ckpt_path"),
    (["fit", "--config", QUICKSTART, "--ckpt_path", "runs/nothere.ckpt"], "runs/nothere.ckpt", "--ckpt_path"),
    (["plot", "runs/nothere", "--out", "c.png"], "runs/nothere", "plot's LOG_DIR"),
    (["fit", "--config", "configs/quickstart.yaml"], "configs/quickstart.yaml", "--config"),
])
def test_a_tool_given_a_path_that_is_not_there_says_so_in_one_line(args, name, what, no_hub, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    message = exit_.value.code if isinstance(exit_.value.code, str) else capsys.readouterr().err.strip()
    assert message.startswith(f"dpo-lightning: not found: {name} (working directory {tmp_path}). For {what}, pass")
    assert "\n" not in message and "Traceback" not in message


def test_our_own_argument_check_reaches_the_command_line_as_one_line(no_hub, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", QUICKSTART, "--data.max_length", "12"])  # the quickstart's max_prompt_length is 16
    assert exit_.value.code.startswith("dpo-lightning: --data.max_prompt_length must be in (0, max_length=12)")
    assert "\n" not in exit_.value.code
    # An error raised inside a library is not ours: it keeps its traceback.
    (tmp_path / "args.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        main(["from-trl", "args.json"])
