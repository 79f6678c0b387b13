"""`dpo-lightning fit` and `dpo-lightning validate`: LightningCLI over `DPOModule` and `PreferenceDataModule`.

Imported only for these two subcommands (main.py dispatches): building the parser imports torch,
transformers and Lightning, seconds the tools and `--help` do without.
"""

from lightning.pytorch.cli import LightningCLI

from dpo_lightning.data import PreferenceDataModule
from dpo_lightning.training.module import DPOModule


class DPOLightningCLI(LightningCLI):
    """LightningCLI with only the subcommands that work, and a resumed fit that trains with the run's settings."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No test or predict: the module has no test_step or predict_step, and `validate` evaluates any
        # split (--data.eval_dataset), a test set included.
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI puts a checkpoint's hyperparameters over the command line's and the config's: `fit --ckpt_path
        # X --model.learning_rate 1e-5` would resume at the old rate, silently. A resumed fit trains with the run's
        # settings and says which changed (`training.checkpoints.reconcile_settings`); `validate` keeps Lightning's.
        if self.config.get("subcommand") != "fit":
            super()._parse_ckpt_path()


def make_cli(args: list[str] | None = None) -> LightningCLI:
    """Parse `args` (default: the command line), run the subcommand, return the CLI (its model, data, trainer)."""
    return DPOLightningCLI(
        DPOModule, PreferenceDataModule, args=args,
        seed_everything_default=42,
        # Lightning's default logger is TensorBoard, which is not a dependency; CSV needs nothing.
        trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs"}}},
        save_config_kwargs={"overwrite": True},
        # The optimizer is --model.optimizer (a name or class_path + init_args) with --model.learning_rate etc.,
        # so that configure_optimizers keeps the weight-decay groups; not LightningCLI's top-level --optimizer.
        auto_configure_optimizers=False,
    )
