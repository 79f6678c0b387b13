"""Lines that other packages print during a run and that the user can do nothing about, filtered by exact text.

Installed when `dpo_lightning` is imported (`install`), so a notebook or script that builds its own
`L.Trainer` reads the same console as the CLI: before the Trainer prints its tips, before fit warns.
Each entry names the line it drops and why it cannot be acted on; any other warning or log line still shows.
Standard library only: importing the package must not cost the seconds torch takes (`dpo-lightning --help`).
`drop_weight_bars` drops transformers' "Loading weights" / "Writing model shards" bars (one per model
loaded or saved), once transformers is imported; its download bars stay.
"""

import logging
import re
import warnings

# (category, message regex): warnings raised inside other packages by calls we cannot change.
THIRD_PARTY_WARNINGS = (
    # Lightning's own CombinedLoader flattens the dataloaders with torch's deprecated LeafSpec (torch 2.10+).
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # peft's PeftModel.__init__ reads transformers' deprecated alias (transformers 5) when wrapping a model.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # A Trainer without a logger argument and without tensorboard installed: a paragraph on a v1.9 change
    # (the logger is a CSVLogger, which is what this package uses anyway).
    (UserWarning, r"Starting from v1\.9\.0, `tensorboardX` has been removed as a dependency"),
)
# Info lines of Lightning's rank-zero logger: advertisements for its cloud products, and the notice that
# `DPOModule.configure_callbacks` replaced the Trainer's default bar and summary (console.py) or a Throughput.
THIRD_PARTY_INFO = re.compile(
    r"💡 Tip|The following callbacks returned in `LightningModule.configure_callbacks` will override existing "
    r"callbacks passed to Trainer: ((ModelSummary|RichModelSummary|RichProgressBar|Throughput)(, |$))+$")
WEIGHT_BARS = ("Loading weights", "Writing model shards")
_weight_bars_dropped = False


class _KnownInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not THIRD_PARTY_INFO.match(str(record.msg))


def install() -> None:
    """Filter `THIRD_PARTY_WARNINGS` and `THIRD_PARTY_INFO`, once; any other line still shows."""
    for category, message in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning's rank_zero_info writes
    if not any(isinstance(f, _KnownInfo) for f in logger.filters):
        logger.addFilter(_KnownInfo())


def drop_weight_bars() -> None:
    """From now on, transformers draws no `WEIGHT_BARS` (a bar per model loaded or saved); download bars stay.

    Called where our code first imports transformers (models.py): importing it here would cost seconds.
    """
    global _weight_bars_dropped
    from transformers.utils import logging as hf_logging

    if _weight_bars_dropped or not hasattr(hf_logging, "set_tqdm_hook"):  # transformers 4 draws neither bar
        return
    previous = None

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in WEIGHT_BARS:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = hf_logging.set_tqdm_hook(hook)
    _weight_bars_dropped = True
