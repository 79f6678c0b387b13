"""Where an optimizer step ends under gradient accumulation, and which steps the loggers see: the rules the module,
the callbacks and online DPO share (a checkpoint, a whole step's log and a step's timing are consistent only there,
and a value gathered since the last log is logged where Lightning writes it)."""

import lightning as L


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether this training batch is the last micro-batch of an optimizer step (with gradient accumulation)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or trainer.is_last_batch


def logs_after(trainer: L.Trainer, steps_done: int) -> bool:
    """Whether the training step that brings the count of optimizer steps to `steps_done` logs: every
    `log_every_n_steps` (TRL's `logging_steps`; Lightning writes the loggers at these steps), and the run's last
    step, so that `trainer.callback_metrics` holds the last steps' values when `fit` returns. Never at 0.

    Inside a training step `steps_done` is `trainer.global_step + 1`; after its optimizer step (on_train_batch_end)
    `trainer.global_step`.
    """
    every, epochs = trainer.log_every_n_steps, trainer.max_epochs
    last = steps_done == trainer.max_steps or (trainer.is_last_batch and epochs is not None and epochs > 0
                                               and trainer.current_epoch + 1 >= epochs)
    return bool(every) and (steps_done % every == 0 or last)
