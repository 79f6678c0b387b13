"""The `dpo-lightning` command: `fit` and `validate` (LightningCLI over `DPOModule` and `PreferenceDataModule`,
in fit.py), plus four tools.

`dpo-lightning fit --config configs/quickstart.yaml`; also `validate`, `--print_config` and every
Trainer flag, as Lightning users expect. The YAML keys are the `__init__` arguments of the two classes.
Four more subcommands work on what a run leaves behind, each a function you can also call from Python:

    dpo-lightning export --ckpt_path X.ckpt --output_dir DIR   # callbacks.export.export_checkpoint
    dpo-lightning plot LOGDIR [--out PNG]                       # tools.plots.plot_metrics
    dpo-lightning from-trl ARGS.json [--out CONFIG.yaml]         # tools.migrate.from_trl
    dpo-lightning inspect-data --config X.yaml [fit's flags] [--rows N]   # PreferenceDataModule.inspect

Each subcommand imports what it needs when it runs: `dpo-lightning --help` imports neither torch nor
transformers (seconds on every call otherwise).
"""

import argparse
import difflib
import sys
from pathlib import Path

from dpo_lightning.utils.locate import PACKAGE, NotFoundError

USAGE = """usage: dpo-lightning SUBCOMMAND [options]

DPO fine-tuning of Hugging Face causal LMs with PyTorch Lightning.

Training (LightningCLI: each DPOModule, PreferenceDataModule and Trainer argument is a flag or a YAML key):
  fit           train, e.g. dpo-lightning fit --config configs/quickstart.yaml
  validate      evaluate the validation split, e.g. of a checkpoint (--ckpt_path X.ckpt); for a test
                set, name it as the validation data: --data.eval_dataset TEST_FILE

Tools:
  export        write a checkpoint's policy as a Hugging Face folder with a model card
  plot          draw a run's curves (metrics.csv) to a PNG
  from-trl      convert TRL DPOConfig / TrainingArguments to a dpo-lightning config
  inspect-data  print a config's data summary and a few rows, token by token

`dpo-lightning SUBCOMMAND -h` lists a subcommand's options.
"""
# LightningCLI's other subcommands, which this module cannot run (no test_step, no predict_step).
NOT_SUBCOMMANDS = {
    "test": "a test set is evaluated as validation is: dpo-lightning validate --config X.yaml "
            "--data.eval_dataset TEST_FILE [--ckpt_path X.ckpt]",
    "predict": "for completions, export the policy (dpo-lightning export) and call its generate(); "
               "samples during validation: dpo_lightning.GenerateSamples",
}


def cli_main(args: list[str] | None = None):
    """`fit` / `validate`: parse `args` (default: the command line), run, return the LightningCLI."""
    from dpo_lightning.cli.fit import make_cli

    return make_cli(args)


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dpo-lightning export", description=(
        "Write a Lightning checkpoint's policy as a Hugging Face folder: safetensors, tokenizer, generation "
        "config and a README.md model card. Loads with AutoModelForCausalLM.from_pretrained."))
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint written by `dpo-lightning fit`")
    parser.add_argument("--output_dir", required=True, help="the folder to write")
    parser.add_argument("--adapter_only", action="store_true",
                        help="for a LoRA policy, save the adapter alone instead of merging it into the base weights")
    parser.add_argument("--tokenizer", help="tokenizer name or path; default: the run's --data.tokenizer, else the model's")
    args = parser.parse_args(argv)
    from dpo_lightning.callbacks.export import export_checkpoint

    out = export_checkpoint(args.ckpt_path, args.output_dir, merge_lora=not args.adapter_only, tokenizer=args.tokenizer)
    print(f"[dpo_lightning] exported {args.ckpt_path} to {out}")


def plot_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dpo-lightning plot", description=(
        "Draw loss, reward accuracy, margins, chosen/rejected rewards and log-probs, train vs val, the learning "
        "rate and the throughput, from a CSV log."))
    parser.add_argument("log_dir", help="a run's log dir (the newest metrics.csv below it of a run that trained is "
                                        "used) or a metrics.csv")
    parser.add_argument("--out", help="the PNG to write; default: metrics.png beside the metrics.csv")
    args = parser.parse_args(argv)
    from dpo_lightning.tools.plots import find_metrics_csv, plot_metrics

    csv_path = find_metrics_csv(args.log_dir)
    out = args.out or csv_path.with_name("metrics.png")
    plot_metrics(csv_path, out)
    print(f"[dpo_lightning] wrote {out}, from {csv_path}")


def from_trl_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dpo-lightning from-trl", description=(
        "Convert TRL DPOConfig / TrainingArguments (a .json or .yaml file of them) to a dpo-lightning config. "
        "Keys with no equivalent are listed, on stderr and as comments in the YAML."))
    parser.add_argument("args_file", help="e.g. the output of TrainingArguments.to_json_string(), or a `trl dpo` YAML")
    parser.add_argument("--out", help="the YAML to write; default: print it")
    args = parser.parse_args(argv)
    from dpo_lightning.tools.migrate import from_trl

    migration = from_trl(args.args_file)
    if args.out:
        with open(args.out, "w") as f:
            f.write(migration.to_yaml())
        print(f"[dpo_lightning] wrote {args.out}")
    else:
        print(migration.to_yaml())
    print(migration.report(), file=sys.stderr)


def inspect_data_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="dpo-lightning inspect-data", description=(
        "Load and tokenize the data `dpo-lightning fit` would train on, with the same configs and flags (--config "
        "A.yaml --config B.yaml --data.max_length 256 ...); print each split's summary (drops by reason, truncation, "
        "lengths) and a few rows token by token: the masked prompt in brackets, then the trained response tokens "
        "(online runs train on prompts: the prompts alone). The model itself is not loaded."))
    parser.add_argument("--rows", type=int, default=3, help="rows to render per split")
    args, fit_args = parser.parse_known_args(argv)
    from dpo_lightning.cli.fit import fit_config
    from dpo_lightning.data import PreferenceDataModule
    from dpo_lightning.data.prompts import train_kind
    from dpo_lightning.utils.tokenizers import tokenizer_source

    config = fit_config(fit_args)
    data_args = config.data.as_dict()
    # As in training, the tokenizer defaults to the model's.
    data_args["tokenizer"] = tokenizer_source(data_args.get("tokenizer"), config.model.model_name_or_path)
    data = PreferenceDataModule(**data_args)
    data.train_kind = train_kind(config.model.online)  # as the module `fit` builds from this config says
    print(data.inspect(n_rows=args.rows))
    if data.val_data is not None:
        print(data.inspect(n_rows=args.rows, stage="val"))


TOOLS = {"export": export_main, "plot": plot_main, "from-trl": from_trl_main, "inspect-data": inspect_data_main}


def main(argv: list[str] | None = None) -> None:
    # The console script passes main()'s return value to sys.exit: it must be None for exit code 0.
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except NotFoundError as error:  # a path in a config or flag that is not there: the message is the whole answer
        sys.exit(f"dpo-lightning: {error}")
    except ValueError as error:  # our own checks name the setting and the fix: their message is the whole answer
        if not raised_by_us(error):
            raise  # an unexpected error keeps its traceback
        sys.exit(f"dpo-lightning: {error}")


def raised_by_us(error: BaseException) -> bool:
    """Whether `error` was raised by this package's code (the innermost frame of its traceback), not by a library."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def run(argv: list[str]) -> None:
    if argv and argv[0] in TOOLS:
        TOOLS[argv[0]](argv[1:])
        return
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    if argv[0] in NOT_SUBCOMMANDS:
        sys.exit(f"dpo-lightning: no `{argv[0]}` subcommand: {NOT_SUBCOMMANDS[argv[0]]}")
    if argv[0] not in ("fit", "validate") and not argv[0].startswith("-"):  # LightningCLI would list its two only
        names = ["fit", "validate", *TOOLS]
        close = difflib.get_close_matches(argv[0], names, n=1)
        sys.exit(f"dpo-lightning: no `{argv[0]}` subcommand{f'; did you mean `{close[0]}`?' if close else '.'} The "
                 f"subcommands are {', '.join(names)}; `dpo-lightning --help` says what each does")
    # args=None when they are the command line: LightningCLI warns when given both.
    cli_main(None if argv == sys.argv[1:] else argv)


if __name__ == "__main__":
    main()
