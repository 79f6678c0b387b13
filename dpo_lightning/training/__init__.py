"""The training step: `DPOModule` (`module`) and what one step runs through.

The log-probs (`logps`), the reference (`reference`, its cache `refcache`), the objective (`objective`) over the pure
losses (`losses`), and the metrics (`metrics`); around them, model loading and adapters (`models`), the optimizer
(`optim`), sharding (`distributed`), throughput, the console, setup checks (`preflight`), what a non-finite loss
does (`nonfinite`) and what a checkpoint holds (`checkpoints`). It may import `online`, `data` and `utils`; nothing below imports it.
"""
