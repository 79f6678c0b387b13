"""The `dpo-lightning` command: `main` dispatches (importing each subcommand's code only when it runs) and `fit`
builds LightningCLI for `fit` and `validate`. The top floor: it may import every wing, and nothing imports it.
"""

from dpo_lightning.cli.main import main

__all__ = ["main"]
