"""`PreemptionCheckpoint`: SIGTERM or SLURM's SIGUSR1 during training becomes a checkpoint at the end of the optimizer
step, from which `fit(ckpt_path=...)` resumes exactly."""

import os
import signal
import subprocess
import threading

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dpo_lightning.utils.steps import ends_optimizer_step


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1 during training, finish the optimizer step, save a checkpoint and exit.

    A cluster warns a job before killing it: SIGTERM on preemption (SLURM, Kubernetes), SIGUSR1 ahead of
    SLURM's time limit with `sbatch --signal=USR1@90`. The signal can land anywhere in a step, mid-backward
    or between two accumulated micro-batches, so the handler only records it; at the end of the next
    optimizer step the weights, optimizer, scheduler and data position agree. The run then stops once that
    step is wholly done: its metrics logged, and the validation due at it run and logged (Lightning's own
    SIGTERM exit point, reached by setting its flag); the checkpoint, saved there in `on_exception`, goes to
    `<dirpath>/<filename>.ckpt` and holds the step as Lightning's "saved after the last batch" state, so a
    resumed run neither repeats that validation nor logs the step again. `fit(ckpt_path=that)`
    (`--ckpt_path` in the CLI) then trains on exactly the batches an uninterrupted run would have. Under
    DDP, FSDP or DeepSpeed the ranks agree at every step on whether any of them was signalled (one
    all-reduce of a scalar), so they save together, whichever rank the signal reached.

    The run exits through Lightning's `SIGTERMException`, with exit code 128 + the signal number (143,
    138): `on_exception` hooks run, `on_fit_end` hooks (an `ExportPretrained` of a half-trained policy)
    don't, and a script can tell a stopped run from a finished one. A signal at the last step lets the run
    finish: nothing is left to resume. On SLURM's requeue signal (SIGUSR1),
    when the Trainer's `SLURMEnvironment` has `auto_requeue` (Lightning's default on SLURM), rank 0 also
    runs `scontrol requeue` for the job, as Lightning's own handler would.

    How it displaces Lightning's handling, during training only (before, e.g. in the sanity check, and
    after, Lightning's handlers are in place): Lightning's SIGTERM handler stops at the end of the current
    batch, even between accumulated micro-batches, and saves nothing; its SLURM SIGUSR1 handler saves
    `hpc_ckpt_<n>.ckpt` from inside the signal handler, wherever the step happens to be, so the optimizer
    state and the data position may disagree with the weights. Lightning's `_teardown` restores the
    handlers it replaced when fit ends, however it ends.

    Budget the signal's lead time (USR1@90: 90 s) for the rest of a step, a validation if one falls due
    there, and writing the checkpoint.

    Args:
        dirpath: folder of the checkpoint. Default: the Trainer's `default_root_dir` (where Lightning also
            writes `hpc_ckpt_<n>.ckpt`), the same at every restart, unlike a logger's versioned folder.
        filename: the checkpoint's file name, without `.ckpt`. A later preemption overwrites it.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self, dirpath: str | None = None, filename: str = "preempted"):
        self.dirpath, self.filename = dirpath, filename
        self.received = 0  # the first signal number received this fit, 0 for none
        self.stopping = 0  # the signal the ranks agreed to stop on, at the end of the current step
        self._validated = False  # a validation ran at the step it stops at
        self._displaced = {}

    def ckpt_path(self, trainer: L.Trainer) -> str:
        return os.path.join(self.dirpath or trainer.default_root_dir, f"{self.filename}.ckpt")

    def output_folder(self, trainer: L.Trainer) -> tuple[str, str]:
        """Where it writes, and the setting that chose it (checked at setup: `training.preflight`)."""
        return os.path.dirname(self.ckpt_path(trainer)), "PreemptionCheckpoint's dirpath (or --trainer.default_root_dir)"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = self.stopping = 0
        self._validated = False
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint is inactive: signal handlers can only be set in the main thread")
            return
        # After Lightning's own handlers, which the Trainer installs just before training starts.
        self._displaced = {signum: signal.signal(signum, self._record) for signum in self.SIGNALS}

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not ends_optimizer_step(trainer, batch_idx):
            return  # mid-accumulation: the gradients so far are in no checkpoint
        # Every rank reduces at every step, so all of them stop at the same one.
        self.stopping = int(trainer.strategy.reduce(torch.tensor(self.received, device=trainer.strategy.root_device),
                                                    reduce_op="max"))
        # Lightning's exit point, after this step's logs and its due validation: the end of the loop's iteration.
        self._lightning_stops(trainer, bool(self.stopping))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._lightning_stops(trainer, False)  # Lightning would cut the due validation short at its first batch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = bool(self.stopping)
        self._lightning_stops(trainer, bool(self.stopping))

    @staticmethod
    def _lightning_stops(trainer: L.Trainer, value: bool) -> None:
        # The flag Lightning's own SIGTERM handler sets (`trainer.received_sigterm`), which ours displaces.
        trainer._signal_connector.received_sigterm = value

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (self.stopping and isinstance(exception, SIGTERMException)):
            return
        path = self.ckpt_path(trainer)
        # Lightning's restore takes a checkpoint whose step has a validation due as saved at that validation's
        # end (ModelCheckpoint's save point), before the loop counts the step for the loggers, and counts it
        # then; this one is saved after: it must hold the count from before, or the resumed run's logged steps
        # are one ahead.
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._batches_that_stepped -= self._validated
        try:
            trainer.save_checkpoint(path)
        finally:
            epoch_loop._batches_that_stepped += self._validated
        rank_zero_info(f"[dpo_lightning] {signal.Signals(self.stopping).name}: saved step {trainer.global_step} to "
                       f"{path}; resume with --ckpt_path {path}")
        if trainer.is_global_zero and self._requeues(trainer, self.stopping):
            requeue_slurm_job()
        exception.code = 128 + self.stopping  # the exit status: a stopped run, told from a finished one
        self.stopping = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._displaced.items():
            signal.signal(signum, handler)
        self._displaced = {}

    @staticmethod
    def _requeues(trainer: L.Trainer, signum: int) -> bool:
        # The environment Lightning's signal connector reads; single-device strategies don't expose it.
        environment = trainer._accelerator_connector.cluster_environment
        return (isinstance(environment, SLURMEnvironment) and environment.auto_requeue
                and signum == environment.requeue_signal)


def requeue_slurm_job() -> None:
    """Put this SLURM job (or array task) back in the queue, with the command Lightning's SIGUSR1 handler uses."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if subprocess.call(["scontrol", "requeue", job_id]) != 0:
        rank_zero_warn(f"`scontrol requeue {job_id}` failed: resubmit the job with --ckpt_path to resume")
    else:
        rank_zero_info(f"[dpo_lightning] requeued SLURM job {job_id}")

