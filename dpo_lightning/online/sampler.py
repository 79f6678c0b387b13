"""Online DPO: the policy writes each training batch's pairs, a reward ranks them (Guo et al. 2024, arXiv:2402.04792).

`DPOModule(online=OnlineConfig(...))` (`model.online` in YAML; a dict of the same keys from Python) trains through
`Online`, whose front door is `pairs`: one training micro-batch of prompts in (`data/prompts.py`), a `Sampled` out:
the pairs as a training batch, or an explicit "no pair" where every prompt tied, and the sampling's metrics.

1. Sample. The current policy completes each prompt `num_samples` times (no grad, eval mode, the KV cache,
   one left-padded batch: `utils/generation.py`, as every generation in the package), with TRL's generation
   settings (`max_new_tokens`, `temperature`, `top_p`, `top_k`). Each completion draws from its own random
   stream, seeded from (seed, step, prompt's row, sample) (`utils.generation.KeyedSampling`): it is the same
   whatever else is in the batch, on whichever rank and however many, so the same run, one resumed from any
   step's checkpoint (on any number of ranks), or one with other batch sizes per rank samples the same
   completions, and training's own random state is left as it was. Each rank completes its own prompts: under
   DDP with its replica, under FSDP2 with the whole weights gathered for the sampling (`unsharded`), then it
   trains sharded.
2. Score. The reward (`rewards.Rewards`: `reward_funcs`, `reward_weights`) scores each completion's text,
   checked before anything trains on it (`rewards.RewardError` names the entry, the setting and the step);
   with `missing_eos_penalty` (TRL's) a completion cut at `max_new_tokens` loses that much.
3. Pair. Each prompt's highest-scoring completion is chosen, its lowest rejected (`pick_pairs`); a prompt
   whose completions all score the same is a tie: skipped, and counted (`objective/ties`).
4. Batch. Each pair keeps the token ids the policy sampled, so its log-probs are those of what was sampled
   (the prompt's ids as the data module made them, cut to `max_prompt_length` there; the response generated
   after them, ending with the stop token the model emitted: EOS, or a chat template's end of turn; a completion
   cut at `max_new_tokens` has none). Decoding and re-encoding would change the ids wherever decode is not
   encode's inverse. The data module's `pair_batch` cuts each pair to `max_length` (rule 3: the responses only,
   each keeps a token) and batches it in its layout; loss, reference and metrics are the offline ones.

What it needs from the run is handed to it once, before training (`bind`): the tokenizer, the data module's
`pair_batch`, and the reference's refresh (`training/reference.py`). As a callback (`DPOModule.configure_callbacks`
adds it) it marks each optimizer step's start: the step the seeds are drawn from, the reference
refreshed every `ref_model_sync_steps` optimizer steps (iterative DPO; TRL's `ref_model_sync_steps` with
`ref_model_mixup_alpha` 1), and the step's time spent sampling, scoring and pairing.

Metrics, under `train/` at each log, over the steps since the last one (TRL's names where TRL has them), each
exact over micro-batches and ranks, and logged only where defined: `objective/scores` (mean reward of all
samples), `objective/ties` (share of prompts skipped), `completions/mean_length` (tokens, stop token included),
`val/contain_eos_token` (share of completions that stopped), `time/generate_share` (share of the wall time since
the last log spent sampling, scoring and pairing); over the pairs, so not where every prompt tied:
`objective/scores_margin` (chosen - rejected), `objective/scores_chosen`, `objective/scores_rejected`.
"""

import functools
import hashlib
import time
from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.loaders import data_seed
from dpo_lightning.online.config import OnlineConfig
from dpo_lightning.online.rewards import RewardError, Rewards
from dpo_lightning.utils.generation import (complete, generation_config, sampling, sharded, split_completion,
                                            stop_ids, texts, unsharded)
from dpo_lightning.utils.steps import ends_optimizer_step, logs_after


def pick_pairs(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each prompt's best and worst completion by score, and which prompts are not ties.

    Args:
        scores: (P, n) one row per prompt, one column per completion.

    Returns:
        chosen (P,) the column of the highest score, rejected (P,) of the lowest (the first such column
        on equal scores), and untied (P,) bool: False where every completion scored the same.

    Example:
        scores [[0.2, 0.9, 0.5], [1.0, 1.0, 1.0]] -> chosen [1, 0], rejected [0, 0], untied [True, False]
    """
    return scores.argmax(1), scores.argmin(1), scores.amax(1) > scores.amin(1)


def sampling_seed(*parts: int) -> int:
    """A 63-bit seed drawn from the parts (seed, step, row, sample): neighbouring steps and rows are unrelated."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


@dataclass
class Sampled:
    """What one micro-batch of prompts became (`Online.pairs`).

    Attributes:
        batch: the pairs as a training batch, in the data module's layout, on the policy's device. Where every
            prompt tied (`loss_scale` 0) it is a stand-in: one completion against itself, for the forward and
            backward that every rank runs together (DDP's gradient all-reduce, FSDP's gathers), trained with
            weight 0 and logged nowhere.
        metrics: name (`Online.METRICS`) -> this micro-batch's values, each (k,), to average with weight 1 each; the
            pairs' metrics are empty where there is no pair.
        loss_scale: what the batch's loss (a mean over its pairs) is multiplied by before backward: its pair count
            (0: no pair), so that `Online.on_before_optimizer_step` makes the step's gradient that of the mean over
            all of the step's pairs, on every rank and micro-batch.
    """

    batch: dict[str, Tensor]
    metrics: dict[str, Tensor]
    loss_scale: float


class Online(L.Callback):
    """Online DPO's sampling, scoring and pairing (the module docstring): `pairs`, for a `DPOModule`.

    Args:
        config: the settings (or a dict of them).
        precomputed: whether the run precomputes the reference's log-probs (`precompute_ref_log_probs`): refused.
        sync_refusal: why the reference cannot be refreshed to the policy (`Reference.refresh_refusal`), or None.
    """

    # The metrics `pairs` returns, averaged per optimizer step by the module (the module docstring says which).
    METRICS = ("objective/scores", "objective/scores_margin", "objective/scores_chosen", "objective/scores_rejected",
               "objective/ties", "completions/mean_length", "val/contain_eos_token")

    def __init__(self, config: OnlineConfig | dict, precomputed: bool = False, sync_refusal: str | None = None):
        config = OnlineConfig.of(config)
        if precomputed:
            raise ValueError("--model.precompute_ref_log_probs cannot precompute online pairs (the policy writes "
                             "new ones every step): set it false with --model.online")
        if config.ref_model_sync_steps and sync_refusal:
            raise ValueError(f"--model.online.ref_model_sync_steps is {config.ref_model_sync_steps} (copy the policy "
                             f"into the reference every {config.ref_model_sync_steps} steps), but {sync_refusal}")
        self.config = config
        self.rewards = Rewards(config.reward_funcs, config.reward_weights, "--model.online.reward_funcs")
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._pair_batch: Callable[[list[dict]], dict[str, Tensor]] | None = None
        self._refresh_reference: Callable[[], None] | None = None
        self._step: int | None = None  # the optimizer step of the batch at hand
        self._sum_over_ranks: Callable[[Tensor], Tensor] = lambda tensor: tensor
        self._window_start, self._generating = None, 0.0  # since the last log
        self._step_pairs = 0.0  # the optimizer step's pairs so far, summed over ranks

    def bind(self, datamodule: L.LightningDataModule, refresh_reference: Callable[[], None]) -> None:
        """Hand over what sampling needs from the run, once before training: the data module's tokenizer and
        `pair_batch` (rule 3 and its layout), and the call that copies the policy into the reference."""
        if not callable(getattr(datamodule, "pair_batch", None)):
            raise ValueError("online DPO (--model.online) reads its prompts through a PreferenceDataModule and "
                             f"batches the pairs it samples with it; got {type(datamodule).__name__}: pass "
                             "trainer.fit(model, datamodule=PreferenceDataModule(...))")
        self._tokenizer, self._pair_batch = datamodule.tokenizer, datamodule.pair_batch
        self._refresh_reference = refresh_reference

    def describe(self) -> str:
        """What online training does, in one line: what it reads, samples and scores."""
        c = self.config
        rewards = " + ".join(name if weight == 1 else f"{weight:g} x {name}"
                             for name, weight in zip(self.rewards.names, self.rewards.weights))
        sync = f"; the reference becomes the policy every {c.ref_model_sync_steps} steps" if c.ref_model_sync_steps \
            else ""
        return (f"online DPO: training reads prompts; the policy writes {c.num_samples} completions per prompt (up "
                f"to {c.max_new_tokens} tokens, temperature {c.temperature:g}), scored by {rewards}; the best and "
                f"the worst form its pair{sync}")

    def syncs_reference(self) -> bool:
        """Whether the reference moves with training (`ref_model_sync_steps`)."""
        return bool(self.config.ref_model_sync_steps)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        refusal = sharded(trainer, "--model.online", every_rank=True)
        if refusal and stage == "fit":
            raise ValueError(refusal)
        if stage == "fit":
            rank_zero_info(f"[dpo_lightning] {self.describe()}")
        self._sum_over_ranks = functools.partial(trainer.strategy.reduce, reduce_op="sum")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step = trainer.global_step
        if batch_idx % trainer.accumulate_grad_batches:
            return  # not the first micro-batch of an optimizer step
        if self._window_start is None:
            self._window_start, self._generating = time.perf_counter(), 0.0
        self._step_pairs = 0.0
        every, step = self.config.ref_model_sync_steps, trainer.global_step
        # At the step's start, not the previous step's end: a checkpoint saved at that end resumes here alike.
        if every and step and step % every == 0:
            self._refresh_reference()

    @property
    def step_has_pairs(self) -> bool:
        """Whether the optimizer step so far has a pair on any rank (none: every prompt tied, the step is skipped)."""
        return bool(self._step_pairs)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        """The step's loss is the mean over all its pairs, on every rank and micro-batch, as an offline step's: each
        micro-batch's loss was its mean times its pair count (`Sampled.loss_scale`), which Lightning divided by the
        accumulation and data parallelism averaged over the replicas; here the sum is divided by the step's count.
        Before gradient clipping and the logged `grad_norm`."""
        pairs, self._step_pairs = self._step_pairs, 0.0
        if not pairs:
            return  # no pair on any rank: the step is skipped (`DPOModule.on_before_optimizer_step`)
        mesh = pl_module.device_mesh
        replicas = mesh["data_parallel"].size() if mesh is not None else trainer.world_size
        scale = trainer.accumulate_grad_batches * replicas / pairs
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(scale)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if ends_optimizer_step(trainer, batch_idx) and logs_after(trainer, trainer.global_step):
            share = self._generating / max(time.perf_counter() - self._window_start, 1e-9)
            self._window_start = None
            pl_module.log("train/time/generate_share", share, on_step=True, on_epoch=False)

    def pairs(self, policy: nn.Module, prompts: dict) -> Sampled:
        """The pairs of one training micro-batch of prompts (`data.prompts.collate_prompts`: `prompt_input_ids`,
        `prompt_text`, `row_ids`): sampled, scored, paired and batched (the module docstring's steps 1 to 4)."""
        if self._pair_batch is None or self._step is None:
            raise RuntimeError("Online.pairs runs inside Trainer.fit, after `bind` and the callback's "
                               "on_train_batch_start (DPOModule does both)")
        start, cfg, tokenizer, step = time.perf_counter(), self.config, self._tokenizer, self._step
        device, n, row_ids = next(policy.parameters()).device, cfg.num_samples, prompts["row_ids"].tolist()
        stops = stop_ids(policy, tokenizer)
        repeated = [p for p in prompts["prompt_input_ids"] for _ in range(n)]
        keys = [sampling_seed(self._seed(), step, row, sample) for row in row_ids for sample in range(n)]
        with unsharded(policy):  # greedy over keyed noise: a sample (`KeyedSampling`)
            completions = complete(policy, repeated, generation_config(tokenizer, stops, cfg.max_new_tokens), device,
                                   sampling(keys, device, cfg.temperature, cfg.top_p, cfg.top_k))
        finished = torch.tensor([split_completion(c, stops)[1] is not None for c in completions])
        # The reward reads the prompt as written (uncut: TRL passes its rewards the original prompts), and the
        # completions decoded; the policy completed the prompt as rule 3 cut it.
        written = [text for text in prompts["prompt_text"] for _ in range(n)]
        scores, error = self._scores(written, texts(tokenizer, repeated, completions, stops)[1], device)
        if cfg.missing_eos_penalty is not None and error is None:
            scores = scores - cfg.missing_eos_penalty * (~finished).double()
        scores = scores.view(-1, n)  # (P, n), float64: ranked at the rewards' own resolution
        chosen, rejected, untied = pick_pairs(scores)
        kept, best_at, worst_at = untied.nonzero().flatten().tolist(), chosen.tolist(), rejected.tolist()
        self._agree(error, len(kept), device)
        rows = [{"prompt_input_ids": repeated[i * n], "chosen_input_ids": completions[i * n + best_at[i]],
                 "rejected_input_ids": completions[i * n + worst_at[i]], "row_id": row_ids[i]} for i in kept]
        if not rows:  # the stand-in: a completion against itself (`Sampled.batch`)
            rows = [{"prompt_input_ids": repeated[0], "chosen_input_ids": completions[0],
                     "rejected_input_ids": completions[0], "row_id": row_ids[0]}]
        index = torch.arange(len(scores))
        best, worst = scores[index, chosen][untied], scores[index, rejected][untied]
        metrics = {"objective/scores": scores.flatten(), "objective/scores_margin": best - worst,
                   "objective/scores_chosen": best, "objective/scores_rejected": worst,
                   "objective/ties": (~untied).double(),
                   "completions/mean_length": torch.tensor([float(len(c)) for c in completions]),
                   "val/contain_eos_token": finished.float()}
        batch = move_data_to_device(self._pair_batch(rows), device)
        self._generating += time.perf_counter() - start
        return Sampled(batch, {name: value.float() for name, value in metrics.items()}, float(len(kept)))

    def _scores(self, prompts: list[str], completions: list[str], device: torch.device) -> tuple[Tensor,
                                                                                                  RewardError | None]:
        """The rewards of the completions (N,) float64, or zeros and the error of a reward that failed, for `_agree`
        to raise on every rank together: a rank that raised alone would leave the others waiting in the step's
        collectives."""
        try:
            return self.rewards.to(device)(prompts, completions, f"at training step {self._step}"), None
        except RewardError as failure:
            return torch.zeros(len(completions), dtype=torch.float64), failure

    def _agree(self, error: RewardError | None, pairs: int, device: torch.device) -> None:
        """One all-reduce per micro-batch: whether a reward failed on any rank (then every rank raises), and the pairs
        of all ranks, counted towards the optimizer step's (`on_before_optimizer_step`)."""
        failed, total = self._sum_over_ranks(torch.tensor([float(error is not None), float(pairs)],
                                                          dtype=torch.float64, device=device)).tolist()
        if failed:
            raise error or RewardError(f"{self.rewards.setting}: a reward failed on another rank at training step "
                                       f"{self._step}; that rank's error names it. Nothing was trained on these "
                                       "completions")
        self._step_pairs += total

    def _seed(self) -> int:
        return data_seed(self.config.seed)  # the data's rule: the run's seed unless one is given
