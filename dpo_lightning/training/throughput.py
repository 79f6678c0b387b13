"""Throughput of a training run: tokens per second, padding, and model FLOPs utilization on GPUs.

`Throughput` (added to every fit by `DPOModule.configure_callbacks`) logs, at the steps where Lightning
logs the training metrics (every `log_every_n_steps` optimizer steps), over the steps since the last log:

- `train/tokens_per_second`: the non-padding tokens that went through the policy, summed over ranks,
  over the wall time of the steps (each step timed from its first micro-batch's start to the end of its
  optimizer step, so validation and checkpointing in between are left out), averaged over ranks. Sums,
  then one division: not a mean of per-rank rates. `train/tokens_per_second_per_rank` is it / world size.
- `train/padding_fraction`: padded positions over all positions of the batches, summed over ranks. The
  padded layout (`batches.collate_pairs`) pads every row to the batch's longest; the shared and packed
  layouts (`packing.collate_shared`) run each prompt once and pad only row ends, which is what prefix
  sharing and packing buy.
- `train/mfu` on a GPU whose peak Lightning knows (`get_available_flops`): model FLOPs per second over
  the peak of all ranks, in the dtype of the Trainer's precision. Per non-padding token (PaLM, Chowdhery
  et al. 2022, arXiv:2204.02311, appendix B):

      policy (forward + backward):   6 N + 12 L d T
      reference (forward only):      2 N +  4 L d T      (not when precomputed or reference-free)

  N counts the matrix weights a token meets: every parameter except the input embedding, plus the output
  head (once more when tied to the embedding), L layers, width d, and T the mean tokens per row (the
  attention span). Activation recomputation is not counted (it is hardware FLOPs, not model FLOPs); the
  head is counted on every position, so with `lean_logps` (head on response tokens only) MFU reads high.

The values go straight to the loggers (not `self.log`), so they stay out of `trainer.callback_metrics`,
which tests and checkpoints compare between runs.
"""

from time import perf_counter

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from torch import Tensor, nn

from dpo_lightning.data.layouts import layout_of
from dpo_lightning.utils.hf import base_causal_lm
from dpo_lightning.utils.steps import ends_optimizer_step

DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
          "16-true": torch.float16}


def count_tokens(batch: dict[str, Tensor]) -> Tensor:
    """[non-padding tokens, all positions, rows] of a padded or shared/packed batch, a float64 tensor (3,) on
    the batch's device: reading it would wait for the device at every micro-batch, so it is summed there.

    Example:
        padded, attention_mask [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]] -> [9, 10, 2]
        shared, pair_ids [[0, 0, 0, 0, 0, 0, 0, -1]]             -> [7, 8, 1]
    """
    mask = layout_of(batch).token_mask(batch)  # (rows, T)
    return torch.stack([mask.sum(), mask.new_tensor(mask.numel(), dtype=torch.long),
                        mask.new_tensor(mask.shape[0], dtype=torch.long)]).double()


def matmul_params(model: nn.Module) -> int:
    """N of the module docstring: the parameters a token multiplies, the output head included."""
    lm = base_causal_lm(model)
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    body = sum(p.numel() for p in lm.parameters() if p is not embedding and p is not head)
    return body + head.numel()


def flops_per_token(pl_module: L.LightningModule, tokens_per_row: float) -> float:
    """Training FLOPs per non-padding token: the policy's forward and backward, the reference's forward."""
    config = base_causal_lm(pl_module.policy).config
    attention = 4 * config.num_hidden_layers * config.hidden_size * tokens_per_row  # forward
    n = matmul_params(pl_module.policy)
    flops = 3 * (2 * n + attention)
    reference = getattr(pl_module, "reference", None)
    # A LoRA policy without a separate reference computes it itself, adapter off: one more forward.
    if pl_module.needs_reference and "train" not in pl_module.ref.tables:  # precomputed: no reference forward
        flops += 2 * matmul_params(reference if reference is not None else pl_module.policy) + attention
    return flops


class Throughput(L.Callback):
    """Log `train/tokens_per_second`, `train/padding_fraction` and, on GPUs, `train/mfu`; see the module docstring."""

    def __init__(self):
        self._window: Tensor | None = None  # tokens, positions, rows (on the device) since the last log
        self._seconds = 0.0
        self._step_start: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._step_start is None:
            self._step_start = self._now(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        counts = count_tokens(outputs["batch"])  # what trained: online, the pairs sampled from the prompts
        self._window = counts if self._window is None else self._window + counts
        if not ends_optimizer_step(trainer, batch_idx):
            return
        self._seconds += self._now(trainer) - self._step_start
        self._step_start = None
        if not trainer.log_every_n_steps or trainer.global_step % trainer.log_every_n_steps:
            return  # 0: Lightning logs no training step, nor does this
        # One collective at the steps every rank logs: sums over ranks, then the divisions.
        window = torch.cat([self._window, self._window.new_tensor([self._seconds])])
        tokens, positions, rows, seconds = trainer.strategy.reduce(window, reduce_op="sum").tolist()
        self._window, self._seconds = None, 0.0
        seconds /= trainer.world_size
        metrics = {"train/tokens_per_second": tokens / seconds,
                   "train/tokens_per_second_per_rank": tokens / seconds / trainer.world_size,
                   "train/padding_fraction": 1 - tokens / positions}
        peak = self._peak_flops(trainer)
        if peak:
            metrics["train/mfu"] = tokens * flops_per_token(pl_module, tokens / rows) / seconds / (
                peak * trainer.world_size)
        for logger in trainer.loggers:  # the row of the step's other training metrics
            logger.log_metrics(metrics, step=trainer.global_step - 1)

    @staticmethod
    def _now(trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)  # kernels are asynchronous
        return perf_counter()

    @staticmethod
    def _peak_flops(trainer: L.Trainer) -> int | None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return None
        return get_available_flops(device, DTYPES.get(str(trainer.precision), torch.float32))
