"""Where an optimizer step ends under gradient accumulation: the one rule the module, the callbacks and online
DPO share (a checkpoint, a whole step's log and a step's timing are consistent only there)."""

import lightning as L


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this training batch is the last micro-batch of an optimizer step (with gradient accumulation)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.is_last_batch
