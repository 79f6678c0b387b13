"""The `dpo-lightning` command: LightningCLI over `DPOModule` and `PreferenceDataModule`.

`dpo-lightning fit --config configs/quickstart.yaml`; also `validate`, `--print_config` and every
Trainer flag, as Lightning users expect. The YAML keys are the `__init__` arguments of the two classes.
"""

from lightning.pytorch.cli import LightningCLI

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.module import DPOModule


def cli_main(args: list[str] | None = None) -> LightningCLI:
    """Parse `args` (default: the command line), run the subcommand, return the CLI (its model, data, trainer)."""
    return LightningCLI(
        DPOModule, PreferenceDataModule, args=args,
        seed_everything_default=42,
        # Lightning's default logger is TensorBoard, which is not a dependency; CSV needs nothing.
        trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs"}}},
        save_config_kwargs={"overwrite": True},
        # configure_optimizers is driven by DPOModule arguments (optimizer, learning_rate, ...), not --optimizer.
        auto_configure_optimizers=False,
    )


def main() -> None:
    # The console script passes main()'s return value to sys.exit: it must be None for exit code 0.
    cli_main()


if __name__ == "__main__":
    main()
