"""`python -m dpo_lightning.cli ...`: the `dpo-lightning` command, where the console script is not on the PATH."""

from dpo_lightning.cli.main import main

main()
