"""Where an optimizer step ends under gradient accumulation, and which steps the loggers see: the rules the module,
the callbacks and online DPO share (a checkpoint, a whole step's log and a step's timing are consistent only there,
and a value gathered since the last log is logged where Lightning writes it)."""

import lightning as L


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this training batch is the last micro-batch of an optimizer step (with gradient accumulation)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.is_last_batch


def logs_after(trainer: L.Trainer, steps_done: int) -> bool:
    """Whether Lightning sends the training step's logged values to the loggers at the optimizer step that brings
    the count of steps to `steps_done`: every `log_every_n_steps` (TRL's `logging_steps`) steps, never at 0.

    Inside a training step `steps_done` is `trainer.global_step + 1`; after its optimizer step (on_train_batch_end)
    `trainer.global_step`. Lightning's own monitors ask the same of a private flag; this is its rule.
    """
    every = trainer.log_every_n_steps
    return bool(every) and steps_done % every == 0
