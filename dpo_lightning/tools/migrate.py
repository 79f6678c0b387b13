"""From TRL to here: a `DPOConfig` / `TrainingArguments` (plus the `trl dpo` script's model and dataset
arguments) as our LightningCLI YAML.

    dpo-lightning from-trl args.json --out configs/mine.yaml    # args.json: TrainingArguments.to_json_string()
    dpo-lightning fit --config configs/mine.yaml

Every key of the input ends up in exactly one of three lists, printed and written as comments at the top
of the YAML, so nothing is dropped silently:
- mapped: a key of ours takes the value (converted where the units differ, e.g. `eval_steps` counts
  optimizer steps and Lightning's `val_check_interval` counts batches);
- same as ours: the value is what we do anyway (`adam_beta1: 0.9`, `label_pad_token_id: -100`);
- not carried over: no equivalent here, with the reason. Check each before trusting the run.
Defaults that transformers applies when a key is absent and that differ from ours (a linear learning-rate
decay, gradient clipping at 1.0, 3 epochs, no evaluation) are written out too, so the converted run
trains as the TRL one did. A mapped key that this version's `DPOModule`, `PreferenceDataModule` or
`Trainer` lacks is listed as not carried over.
"""

import ast
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_lightning.tools.trl_names import (LOGGERS, LORA_DEFAULTS, LOSS_RENAMES, NO_EQUIVALENT, NOT_NEEDED,
                                           OPTIMIZERS, RENAMES, SAME_AS_OURS, SCHEDULERS, TRL_DEFAULTS,
                                           TRL_LOSS_DEFAULTS)
from dpo_lightning.utils.locate import PACKAGE, existing


@dataclass
class Migration:
    """The converted config and, for every input key, what became of it: (key, value, where or why)."""

    config: dict[str, Any] = field(default_factory=lambda: {"trainer": {}, "model": {}, "data": {}})
    mapped: list[tuple[str, Any, str]] = field(default_factory=list)
    same: list[tuple[str, Any, str]] = field(default_factory=list)
    defaults: list[tuple[str, Any, str]] = field(default_factory=list)
    not_carried: list[tuple[str, Any, str]] = field(default_factory=list)
    defaulted: set[str] = field(default_factory=set)  # keys absent from the input, filled from TRL_DEFAULTS

    def set(self, target: str, value: Any, key: str, original: Any, note: str = "") -> None:
        """Set our key `target` ("section.name") to `value`, recording that TRL's `key` gave it."""
        section, _, name = target.rpartition(".")
        (self.config[section] if section else self.config)[name] = value
        where = f"{target}: {json.dumps(value)}" + (f" ({note})" if note else "")
        (self.defaults if key in self.defaulted else self.mapped).append((key, original, where))

    def missing(self) -> list[str]:
        return [f"{section}.{name}" for section, name in (("model", "model_name_or_path"), ("data", "dataset"))
                if name not in self.config[section]]

    def report(self) -> str:
        """The lists as text; the YAML carries it as comments."""
        lines = [f"REQUIRED, absent from the arguments: set {name}" for name in self.missing()]
        for title, items in (("mapped", self.mapped), ("same as ours, no key needed", self.same),
                             ("TRL defaults written out (absent from the arguments)", self.defaults),
                             ("NOT CARRIED OVER, check each", self.not_carried)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  {key}: {json.dumps(value, default=str)} -> {where}" for key, value, where in items]
        return "\n".join(lines)

    def to_yaml(self) -> str:
        header = ["Converted from TRL arguments by dpo_lightning.tools.migrate (`dpo-lightning from-trl`).",
                  "Run: dpo-lightning fit --config THIS_FILE", "", *self.report().splitlines()]
        body = yaml.safe_dump(self.config, sort_keys=False)
        return "\n".join("#" + (" " + line if line else "") for line in header) + "\n" + body


def from_trl(args: dict[str, Any] | str | Path) -> Migration:
    """Convert TRL arguments (a dict, or a .json/.yaml file of them) to our config; see the module docstring."""
    if not isinstance(args, dict):
        text = Path(existing(args, "from-trl's ARGS_FILE", "trl")).read_text()
        args = json.loads(text) if str(args).endswith(".json") else yaml.safe_load(text)
    args = {("eval_strategy" if k == "evaluation_strategy" else k): v for k, v in args.items()}  # the 0.2x name
    m = Migration()
    for key, value in trl_defaults(args).items():
        args[key] = value
        m.defaulted.add(key)
    if "dataset_name" in args and "dataset_test_split" not in args and args["eval_strategy"] != "no":
        args["dataset_test_split"] = "test"  # the `trl dpo` script's default
        m.defaulted.add("dataset_test_split")
    handled = _special(args, m) | _loss_options(args, m)
    for key, value in args.items():
        if key in handled:
            continue
        if key in SAME_AS_OURS and value == SAME_AS_OURS[key]:
            m.same.append((key, value, "our behaviour"))
        elif key in NOT_NEEDED:
            m.same.append((key, value, NOT_NEEDED[key]))
        elif key in RENAMES and value is not None:
            m.set(RENAMES[key], value, key, value)
        elif key in RENAMES:
            m.same.append((key, value, "unset: our default"))
        else:
            m.not_carried.append((key, value, NO_EQUIVALENT.get(key, "unknown to the converter")))
    _check_targets(m)
    _add_callbacks_and_logger(args, m)
    for section, first in (("model", "model_name_or_path"), ("data", "dataset")):  # the names lead their section
        m.config[section] = dict(sorted(m.config[section].items(), key=lambda item: item[0] != first))
    return m


def trl_defaults(args: dict[str, Any]) -> dict[str, Any]:
    """The values TRL gives the keys absent from `args` where they differ from ours (written out, and listed)."""
    absent = {**TRL_DEFAULTS, **(LORA_DEFAULTS if args.get("use_peft") else {})}
    if (args.get("max_steps") or -1) > 0:
        del absent["num_train_epochs"]  # max_steps decides, as in transformers
    if not args.get("fp16"):
        absent["bf16"] = True  # TRL's base config: bf16 unless fp16 is set
    if args.get("per_device_train_batch_size", 8) != 8:
        absent["per_device_eval_batch_size"] = 8  # ours follows the train batch size
    if args.get("max_length", 1024) is not None:  # TRL 1.16 has no prompt limit: it cuts the whole sequence to
        absent["max_prompt_length"] = args.get("max_length", 1024) - 1  # max_length, so a prompt may take all but one
    return {key: value for key, value in absent.items() if key not in args}


def _special(args: dict[str, Any], m: Migration) -> set[str]:
    """The keys whose conversion depends on others or changes units; returns the keys it consumed."""
    max_steps = args.get("max_steps") or -1
    _optimizer_and_schedule(args, m, max_steps)
    _precision(args, m)
    _evaluation(args, m, args.get("gradient_accumulation_steps") or 1, max_steps)
    _lora(args, m)
    if "loss_type" in args:
        losses, ours = our_losses(args["loss_type"]), loss_names()
        unknown = [name for name in losses if name not in ours]
        if unknown:
            m.not_carried.append(("loss_type", args["loss_type"], f"{unknown} not among ours: {sorted(ours)}"))
        else:
            renamed = [name for name in losses if name not in _listed(args["loss_type"])]
            value = losses[0] if isinstance(args["loss_type"], str) else losses
            note = f"{renamed} by our names" if renamed else ""
            m.set("model.loss_type", value, "loss_type", args["loss_type"], note)
    if args.get("logging_steps") is not None:
        steps = _steps(args, m, "logging_steps", max_steps)
        if steps:
            note = f"a share of max_steps {max_steps}, rounded up" if args["logging_steps"] < 1 else ""
            m.set("trainer.log_every_n_steps", steps, "logging_steps", args["logging_steps"], note)
    if max_steps > 0:
        m.set("trainer.max_steps", max_steps, "max_steps", max_steps)
        if "num_train_epochs" in args:
            m.same.append(("num_train_epochs", args["num_train_epochs"], "ignored: max_steps is set (as in transformers)"))
    else:
        if "max_steps" in args:
            m.same.append(("max_steps", args["max_steps"], "unset: train by epochs"))
        epochs = args["num_train_epochs"]
        if float(epochs).is_integer():
            m.set("trainer.max_epochs", int(epochs), "num_train_epochs", epochs)
        else:
            m.not_carried.append(("num_train_epochs", epochs, "a fraction of an epoch: give max_steps instead"))
    return {"optim", "lr_scheduler_type", "bf16", "fp16", "eval_strategy", "eval_steps", "num_train_epochs",
            "logging_steps", "max_steps", "warmup_steps", "warmup_ratio", "loss_type", "generate_during_eval", "report_to", "run_name",
            "logging_dir", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
            "save_strategy", "save_steps"}


def our_losses(loss_type: str | list[str]) -> list[str]:
    """TRL's `loss_type` (a name or a list of names) as a list of our names (`LOSS_RENAMES`)."""
    return [LOSS_RENAMES.get(name, name) for name in _listed(loss_type)]


def _listed(loss_type: str | list[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def absolute_steps(steps: float, max_steps: int) -> int | None:
    """transformers' step counts: a value below 1 is a share of max_steps, rounded up (`TrainerState.compute_steps`);
    None where max_steps is not known (a run by epochs, whose length transformers takes from the data)."""
    if steps >= 1:
        return int(steps)
    return math.ceil(steps * max_steps) if max_steps > 0 else None


def _steps(args: dict[str, Any], m: Migration, key: str, max_steps: int) -> int | None:
    """`args[key]` in steps, or None with the key listed as not carried over."""
    steps = absolute_steps(args[key], max_steps)
    if steps is None:
        m.not_carried.append((key, args[key], "a share of the training steps needs max_steps: give it in steps"))
    return steps


def _loss_options(args: dict[str, Any], m: Migration) -> set[str]:
    """The options only some losses take that the chosen losses do not (`TRL_LOSS_DEFAULTS`); the keys consumed."""
    taken = loss_options()
    losses = our_losses(args.get("loss_type", "sigmoid"))
    losses = losses if set(losses) <= set(taken) else ["sigmoid"]  # loss_type not carried: ours, the default
    ignored = {key for key in TRL_LOSS_DEFAULTS if key in args and not any(key in taken[name] for name in losses)}
    for key in sorted(ignored):
        users = sorted(name for name, options in taken.items() if key in options)
        if args[key] is None or args[key] in TRL_LOSS_DEFAULTS[key]:
            m.same.append((key, args[key], f"TRL's default, which loss_type {losses} ignores"))
        else:
            m.not_carried.append((key, args[key], f"loss_type {losses} does not take it here; {users} do"))
    return ignored


def _optimizer_and_schedule(args: dict[str, Any], m: Migration, max_steps: int) -> None:
    if "optim" in args:
        if args["optim"] in OPTIMIZERS:
            m.set("model.optimizer", OPTIMIZERS[args["optim"]], "optim", args["optim"])
        else:
            m.not_carried.append(("optim", args["optim"], f"ours are {sorted(OPTIMIZERS)}"))
    kind = args["lr_scheduler_type"]
    if kind in SCHEDULERS:
        note = "transformers' 'constant' skips warm-up, ours warms up" if kind == "constant" else ""
        m.set("model.lr_scheduler_type", SCHEDULERS[kind], "lr_scheduler_type", kind, note)
    else:
        m.not_carried.append(("lr_scheduler_type", kind, f"ours are {sorted(SCHEDULERS)}"))
    # transformers 5 folds warmup_ratio into warmup_steps: a float below 1 is a share of the training steps.
    warmup, ratio = args.get("warmup_steps") or 0, args.get("warmup_ratio") or 0
    key = "warmup_steps" if 0 < warmup < 1 or not ratio else "warmup_ratio"
    if 0 < warmup < 1:
        ratio, warmup = warmup, 0
    if warmup:
        m.set("model.warmup_steps", int(warmup), "warmup_steps", warmup)
    elif ratio and max_steps > 0:
        m.set("model.warmup_steps", math.ceil(ratio * max_steps), key, ratio, "rounded up, as transformers does")
    elif ratio:
        m.not_carried.append((key, ratio, "a warm-up share needs max_steps; give warmup_steps"))
    for unused in ("warmup_steps", "warmup_ratio"):
        if unused in args and not args[unused]:
            m.same.append((unused, args[unused], "no warm-up from this key"))


def _precision(args: dict[str, Any], m: Migration) -> None:
    if args.get("bf16"):
        m.set("trainer.precision", "bf16-mixed", "bf16", True)
        if args.get("fp16"):
            m.not_carried.append(("fp16", True, "bf16 is also set: bf16-mixed is used"))
    elif args.get("fp16"):
        m.set("trainer.precision", "16-mixed", "fp16", True)
    for key in ("bf16", "fp16"):
        if key in args and not args[key]:
            m.same.append((key, args[key], "off: float32 unless the other is set"))


def _evaluation(args: dict[str, Any], m: Migration, accumulate: int, max_steps: int) -> None:
    strategy = args["eval_strategy"]
    if strategy == "no":
        m.set("trainer.limit_val_batches", 0, "eval_strategy", strategy)
    elif strategy == "epoch":
        m.set("trainer.check_val_every_n_epoch", 1, "eval_strategy", strategy)
    elif strategy == "steps":
        key = "eval_steps" if args.get("eval_steps") else "logging_steps"  # transformers' fallback
        steps = absolute_steps(args.get(key) or 500, max_steps)
        if steps is None:
            m.not_carried.append((key, args[key], "a share of the training steps needs max_steps: give eval_steps "
                                                  "in steps (validation runs once per epoch)"))
        else:
            # eval_steps counts optimizer steps; val_check_interval counts batches, and must count across epochs.
            note = f"{steps} steps x {accumulate} batches each" if accumulate > 1 else ""
            m.set("trainer.val_check_interval", steps * accumulate, "eval_steps", args.get("eval_steps"), note)
            m.set("trainer.check_val_every_n_epoch", None, "eval_strategy", strategy)
    else:
        m.not_carried.append(("eval_strategy", strategy, "one of no, steps, epoch"))
    if "eval_steps" in args and strategy != "steps":
        m.same.append(("eval_steps", args["eval_steps"], f"unused with eval_strategy {strategy}"))


def _lora(args: dict[str, Any], m: Migration) -> None:
    keys = [k for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules") if k in args]
    if not args.get("use_peft"):
        if "use_peft" in args:
            m.same.append(("use_peft", args["use_peft"], "full fine-tuning"))
        m.same.extend((k, args[k], "unused: use_peft is not set") for k in keys)
        return
    m.mapped.append(("use_peft", True, "LoRA: model.lora_r, lora_alpha, lora_dropout"))
    for key in keys:
        value, note = args[key], ""
        if key == "lora_dropout" and value and args.get("disable_dropout", True):
            value, note = 0.0, "TRL's disable_dropout zeroes every dropout, LoRA's too; ours refuses the pair"
        m.set(f"model.{key}", value, key, args[key], note)


def _check_targets(m: Migration) -> None:
    """Move a mapped key whose target this version lacks to the not-carried list."""
    lightning = Path(importlib.util.find_spec("lightning").origin).parent  # found, not imported
    accepted = {"model": init_arguments(PACKAGE / "training" / "module.py", "DPOModule"),
                "data": init_arguments(PACKAGE / "data" / "datamodule.py", "PreferenceDataModule"),
                "trainer": init_arguments(lightning / "pytorch" / "trainer" / "trainer.py", "Trainer")}
    for items in (m.mapped, m.defaults):
        for entry in list(items):
            key, value, where = entry
            section, _, name = where.split(":")[0].rpartition(".")
            if section in accepted and name not in accepted[section]:
                m.config[section].pop(name, None)
                items.remove(entry)
                m.not_carried.append((key, value, f"{section}.{name} is not an argument in this version"))


# from-trl reads which arguments and losses this version has from the source, without importing it: importing
# torch, transformers and Lightning would take seconds (tests/test_cli.py checks both against the imports).
def init_arguments(source: Path, class_name: str) -> set[str]:
    """The parameter names of `class_name.__init__` in the Python file `source`."""
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            init = next(f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__")
            return {a.arg for a in init.args.posonlyargs + init.args.args + init.args.kwonlyargs} - {"self"}
    raise LookupError(f"no class {class_name} in {source}")


def loss_names() -> set[str]:
    """The keys of `training.losses.LOSSES`, a dict literal in training/losses/__init__.py."""
    return set(loss_options())


def loss_options() -> dict[str, set[str]]:
    """Each loss of `training.losses.LOSSES` -> the keyword options its function takes (`LOSS_ARGS` there)."""
    folder = PACKAGE / "training" / "losses"
    functions = {node.name: {a.arg for a in node.args.kwonlyargs} for path in folder.glob("*.py")
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    for node in ast.parse((folder / "__init__.py").read_text()).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "LOSSES" for t in targets):
            return {key.value: functions[value.id] for key, value in zip(node.value.keys, node.value.values)}
    raise LookupError("no LOSSES dict in training/losses/__init__.py")


def _add_callbacks_and_logger(args: dict[str, Any], m: Migration) -> None:
    """Our standard callbacks (as in configs/), GenerateSamples for generate_during_eval, checkpoints, loggers."""
    callbacks = [{"class_path": "dpo_lightning.callbacks.ValidationSummary"},
                 {"class_path": "dpo_lightning.callbacks.ExportPretrained"}]
    if args.get("generate_during_eval"):
        callbacks.append({"class_path": "dpo_lightning.callbacks.GenerateSamples"})
        m.mapped.append(("generate_during_eval", True, "trainer.callbacks: GenerateSamples"))
    elif "generate_during_eval" in args:
        m.same.append(("generate_during_eval", args["generate_during_eval"], "no GenerateSamples callback"))
    save = args.get("save_strategy", "steps" if "save_steps" in args else None)  # transformers' default: steps
    steps = None
    if save == "steps" and args.get("save_steps"):
        steps = _steps(args, m, "save_steps", args.get("max_steps") or -1)
    if steps:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"every_n_train_steps": steps, "save_top_k": -1}})
        m.mapped.append(("save_steps", args["save_steps"], f"trainer.callbacks: ModelCheckpoint every {steps} steps"))
    elif save == "epoch":
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"every_n_epochs": 1, "save_top_k": -1}})
    elif save == "no":
        m.config["trainer"]["enable_checkpointing"] = False
    if "save_strategy" in args:
        m.mapped.append(("save_strategy", save, "trainer.callbacks / enable_checkpointing"))
    if "save_steps" in args and save != "steps":
        m.same.append(("save_steps", args["save_steps"], f"unused with save_strategy {save}"))
    m.config["trainer"]["callbacks"] = callbacks

    root = args.get("output_dir") or "runs"
    name = args.get("run_name") or "trl"
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": name}}]
    report_to = args.get("report_to") or []
    for target in [report_to] if isinstance(report_to, str) else report_to:
        if target in LOGGERS:
            init = {"save_dir": args.get("logging_dir") or root} if target != "wandb" else {"name": name}
            loggers.append({"class_path": LOGGERS[target], "init_args": init})
        elif target != "none":
            m.not_carried.append(("report_to", target, f"name loggers among {sorted(LOGGERS)} (CSV is always on)"))
    for key in ("report_to", "run_name", "logging_dir"):
        if key in args:
            m.mapped.append((key, args[key], "trainer.logger"))
    m.config["trainer"]["logger"] = loggers
