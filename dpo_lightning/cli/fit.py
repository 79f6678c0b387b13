"""`dpo-lightning fit` and `dpo-lightning validate`: LightningCLI over `DPOModule` and `PreferenceDataModule`; the
same parser reads `inspect-data`'s configs and flags (`fit_config`).

Imported only for these subcommands (main.py dispatches): building the parser imports torch, transformers and
Lightning, seconds the tools and `--help` do without.
"""

import dataclasses
import difflib
import os
import re
import sys
import typing
import warnings
from typing import NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.training.module import DPOModule
from dpo_lightning.utils.locate import existing, not_found

# jsonargparse's messages for a key it does not know, on the command line and in a config file.
UNKNOWN_KEY = re.compile(r"unrecognized arguments: --([^\s=]+)|does not accept option '([^']+)'|"
                         r"""Parser key "([^"]+)":.*?Option '([^']+)' is not accepted""", re.S)
# ... and for a --config file that is not there.
MISSING_CONFIG = re.compile(r"""Parser key "config":.*?File does not exist: '([^']+)'""", re.S)
# The checkpoint names the Trainer resolves itself, rather than paths.
TRAINER_CKPT_NAMES = ("best", "last", "hpc", "registry")


class Parser(LightningArgumentParser):
    """LightningCLI's parser, whose answer to an unknown key (`--model.betta 0.2`, a YAML `max_lenght`) is one line
    naming it, its section and the closest valid key, instead of the whole usage (113 lines) above one line."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self  # a config file's key is checked by the main parser
        found, config = UNKNOWN_KEY.search(message), MISSING_CONFIG.search(message)
        if found and self.exit_on_error:  # (jsonargparse turns exit_on_error off to try a value against each type)
            # The last form: a key of a typed section (`--model.online.num_sampels`, in a file too).
            key = found.group(1) or found.group(2) or f"{found.group(3)}.{found.group(4)}"
            sys.stderr.write(f"error: {unknown_key(key, parser)}\n")
            self.exit(2)
        if config and self.exit_on_error:
            sys.stderr.write(f"dpo-lightning: {not_found(os.path.relpath(config.group(1)), '--config', 'config')}\n")
            self.exit(2)
        super().error(message, ex)


def unknown_key(key: str, parser: LightningArgumentParser) -> str:
    """The message for an unknown `key` ("model.betta"): its section, and the closest key of that section."""
    keys = [a.dest for a in parser._actions if not a.dest.endswith(".help") and a.dest not in ("help", "config")]
    section, _, name = key.rpartition(".")
    in_section = [k[len(section) + 1:] for k in keys if k.startswith(f"{section}.")] or fields_of(section, parser)
    command = f"`{parser.prog.replace(' [options]', '')} --help` lists every key"
    if not in_section:  # no such section (`--trainr.max_steps`): the closest whole key
        close = difflib.get_close_matches(key, keys, n=1)
        return f"unknown key {key!r} (--{key}){f'; did you mean --{close[0]}?' if close else '.'} {command}"
    close = difflib.get_close_matches(name, in_section, n=1)
    hint = f"; did you mean {close[0]!r} (--{section}.{close[0]})?" if close else "."
    return f"unknown key {name!r} in the {section} section (--{key}){hint} {command}"


def fields_of(section: str, parser: LightningArgumentParser) -> list[str]:
    """The keys of a section typed as a dataclass (`--model.online`: `OnlineConfig`), which the parser holds as one
    key rather than one per field."""
    action = next((a for a in parser._actions if a.dest == section), None)
    hint = getattr(action, "_typehint", None)
    return [field.name for kind in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(kind)
            for field in dataclasses.fields(kind)]


class DPOLightningCLI(LightningCLI):
    """LightningCLI with only the subcommands that work, and a resumed fit that trains with the run's settings."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No test or predict: the module has no test_step or predict_step, and `validate` evaluates any
        # split (--data.eval_dataset), a test set included.
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A data file's path stays a path: jsonargparse reads a string naming a file into a dict or list where the
        # type allows one (DatasetSource does), so `--data.dataset one_row.jsonl` became that row as a dict of
        # columns, and a .json array in-memory rows. (No public switch: the action's `_enable_path`.)
        for action in parser._actions:
            if action.dest in ("data.dataset", "data.eval_dataset") and hasattr(action, "_enable_path"):
                action._enable_path = False

    def _parse_ckpt_path(self) -> None:
        # A checkpoint path that is not there fails now, in one line, not after the model has loaded.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and not str(ckpt_path).startswith(TRAINER_CKPT_NAMES) and "://" not in str(ckpt_path):
            self.config[subcommand].ckpt_path = existing(ckpt_path, "--ckpt_path", "checkpoint")
        # LightningCLI puts a checkpoint's hyperparameters over the command line's and the config's: `fit --ckpt_path
        # X --model.learning_rate 1e-5` would resume at the old rate, silently. A resumed fit trains with the run's
        # settings and says which changed (`training.checkpoints.reconcile_settings`); `validate` keeps Lightning's.
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()


class ParsedOnly(DPOLightningCLI):
    """The `fit` parser's config for a command line, checked as `fit` checks it, nothing instantiated."""

    def instantiate_classes(self) -> None:
        pass


OPTIONS = dict(
    parser_class=Parser, seed_everything_default=42,
    # Lightning's default logger is TensorBoard, which is not a dependency; CSV needs nothing.
    trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                 "init_args": {"save_dir": "runs"}}},
    save_config_kwargs={"overwrite": True},
    # The optimizer is --model.optimizer (a name or class_path + init_args) with --model.learning_rate etc.,
    # so that configure_optimizers keeps the weight-decay groups; not LightningCLI's top-level --optimizer.
    auto_configure_optimizers=False,
)


def make_cli(args: list[str] | None = None) -> LightningCLI:
    """Parse `args` (default: the command line), run the subcommand, return the CLI (its model, data, trainer)."""
    return DPOLightningCLI(DPOModule, PreferenceDataModule, args=args, parser_kwargs={"prog": "dpo-lightning"},
                           **OPTIONS)


def fit_config(args: list[str]) -> Namespace:
    """The config `fit` would run for `args` (config files, in order, then flags; no subcommand), parsed and checked
    by the same parser, without loading anything: what `inspect-data` reads."""
    with warnings.catch_warnings():  # args and a command line both given: main.py hands over the command's part
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return ParsedOnly(DPOModule, PreferenceDataModule, args=args, run=False,
                          parser_kwargs={"prog": "dpo-lightning fit"}, **OPTIONS).config
