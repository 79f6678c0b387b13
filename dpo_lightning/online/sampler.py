"""Online DPO: the policy writes each training batch's pairs, a reward ranks them (Guo et al. 2024, arXiv:2402.04792).

`DPOModule(online={...})` (`model.online` in YAML) turns it on; the data then gives prompts only (a `prompt`
column of text or messages; a preference set's other columns are not read). For each training batch:

1. Sample. The current policy completes each prompt `num_samples` times (no grad, eval mode, the KV cache,
   one left-padded batch), with TRL's generation settings (`max_new_tokens`, `temperature`, `top_p`,
   `top_k`). The sampling seed is drawn from (seed, step, micro-batch, rank) inside `torch.random.fork_rng`,
   so the same run samples the same completions and training's own random state is left as it was.
   Under DDP each rank completes its own prompts.
2. Score. The reward (`rewards.Rewards`: `reward_funcs`, `reward_weights`) scores each completion's text;
   with `missing_eos_penalty` (TRL's) a completion cut at `max_new_tokens` loses that much.
3. Pair. Each prompt's highest-scoring completion is chosen, its lowest rejected (`pick_pairs`); a prompt
   whose completions all score the same is a tie: skipped, and counted (`objective/ties`).
4. Tokenize and train. Each pair keeps the token ids the policy sampled, so its log-probs are those of what
   was sampled: rule 2 holds by construction (the prompt's ids as the data module made them, the response
   generated after them, ending with the stop token the model emitted: EOS, or a chat template's end of
   turn; a completion cut at `max_new_tokens` has none), and rule 3 cuts the pair to fit (`rules.truncate`).
   Decoding and re-encoding instead would change the ids wherever decode is not encode's inverse. Then the
   data module's collator, and the loss, reference and metrics, unchanged.

The reference is the starting weights; `ref_model_sync_steps: N` copies the policy into it every N optimizer
steps (iterative DPO; TRL's `ref_model_sync_steps` with `ref_model_mixup_alpha` 1), and checkpoints then
carry it. With LoRA the reference is the adapter switched off, as offline.

Metrics, per optimizer step under `train/` (TRL's names where TRL has them): `objective/scores` (mean reward
of all samples), `objective/scores_margin` (chosen - rejected), `objective/scores_chosen`,
`objective/scores_rejected`, `objective/ties` (share of prompts skipped), `completions/mean_length` (tokens,
stop token included), `val/contain_eos_token` (share of completions that stopped), `time/generate_share`
(share of the optimizer step's wall time spent sampling, scoring and pairing).

`GreedyReward`, a callback, scores the policy's greedy completions of the validation prompts with a reward
at every validation: `val/reward/greedy` (the quickstart's solve rate).
"""

import hashlib
import os
import time
from dataclasses import dataclass, fields

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torchmetrics import MeanMetric

from dpo_lightning.data.rules import adds_bos, truncate
from dpo_lightning.online.rewards import Rewards
from dpo_lightning.utils.generation import complete, generation_config, seeded, sharded, split_completion, stop_ids, texts
from dpo_lightning.utils.steps import ends_optimizer_step

METRICS = ("objective/scores", "objective/scores_margin", "objective/scores_chosen", "objective/scores_rejected",
           "objective/ties", "completions/mean_length", "val/contain_eos_token")


@dataclass
class OnlineConfig:
    """`model.online`'s keys (see docs/online.md). TRL's names where TRL has one.

    Args:
        reward_funcs: the reward: an import path, a reward model's folder, or a list of them (`rewards.py`).
        reward_weights: one weight per reward; default 1 each.
        num_samples: completions per prompt (at least 2); the best and the worst form the pair.
        max_new_tokens: tokens generated per completion at most.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold; 1.0 samples from the whole distribution.
        top_k: sample among the k likeliest tokens only; 0 for no limit.
        missing_eos_penalty: subtracted from the score of a completion cut at `max_new_tokens`.
        ref_model_sync_steps: copy the policy into the reference every N optimizer steps (iterative DPO).
        seed: the sampling seed's base. Default: the run's `seed_everything` seed, else 0.
    """

    reward_funcs: str | list[str]
    reward_weights: list[float] | None = None
    num_samples: int = 2
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    missing_eos_penalty: float | None = None
    ref_model_sync_steps: int | None = None
    seed: int | None = None

    def __post_init__(self):
        checks = {"num_samples": self.num_samples >= 2, "max_new_tokens": self.max_new_tokens >= 1,
                  "temperature": self.temperature > 0, "top_p": 0 < self.top_p <= 1, "top_k": self.top_k >= 0,
                  "ref_model_sync_steps": self.ref_model_sync_steps is None or self.ref_model_sync_steps >= 1}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"--model.online.{key} = {getattr(self, key)} is out of range: num_samples >= 2, "
                                 "max_new_tokens >= 1, temperature > 0, 0 < top_p <= 1, top_k >= 0, "
                                 "ref_model_sync_steps >= 1 (or null)")


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
    """A 63-bit seed drawn from the parts (seed, step, micro-batch, rank): neighbouring steps are unrelated."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


class Online(L.Callback):
    """Online DPO's sampling, scoring and pairing for a `DPOModule` (see the module docstring), and its hooks.

    The module calls `pairs` at the start of each training step; as a callback (the module's
    `configure_callbacks` adds it) it syncs the reference and logs the generation time's share.
    """

    def __init__(self, config: dict, module: L.LightningModule):
        unknown = set(config) - {f.name for f in fields(OnlineConfig)}
        if unknown:
            raise ValueError(f"--model.online: unknown key(s) {sorted(unknown)}; the keys are "
                             f"{[f.name for f in fields(OnlineConfig)]}")
        self.config = OnlineConfig(**config)
        hp = module.hparams
        if hp.precompute_ref_log_probs:
            raise ValueError("--model.precompute_ref_log_probs cannot precompute online pairs (the policy writes "
                             "new ones every step): set it false with --model.online")
        if self.config.ref_model_sync_steps and module.ref.model is None:
            raise ValueError("--model.online.ref_model_sync_steps needs a reference model of its own (full "
                             "fine-tuning with a reference loss); with LoRA the reference is the adapter switched "
                             "off, which cannot be synced: remove ref_model_sync_steps")
        self.rewards = Rewards(self.config.reward_funcs, self.config.reward_weights, "--model.online.reward_funcs")
        module.train_metrics.update({name: MeanMetric(sync_on_compute=False) for name in METRICS})
        self._synced_at, self._step_start, self._generating = 0, 0.0, 0.0

    def syncs_reference(self) -> bool:
        """Whether the reference moves with training (then checkpoints must carry its weights)."""
        return bool(self.config.ref_model_sync_steps)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches:
            return  # not the first micro-batch of an optimizer step
        self._step_start, self._generating = time.perf_counter(), 0.0
        every, step = self.config.ref_model_sync_steps, trainer.global_step
        # At the step's start, not the previous step's end: a checkpoint saved at that end resumes here alike.
        if every and step and step % every == 0 and step != self._synced_at:
            module.ref.model.load_state_dict(module.policy.state_dict())
            self._synced_at = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if ends_optimizer_step(trainer, batch_idx):
            share = self._generating / max(time.perf_counter() - self._step_start, 1e-9)
            module.log("train/time/generate_share", share, on_step=True, on_epoch=False)

    def pairs(self, module: L.LightningModule, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """The training batch of pairs for a batch of prompts (`collate_prompts`): sampled, scored, paired;
        `batch` itself becomes it.

        If every prompt of this rank ties, the batch holds one pair of a completion against itself and
        `no_pairs`: its DPO margin is 0 whatever the weights, and the module trains on none of it.
        """
        start, trainer = time.perf_counter(), module.trainer
        datamodule, cfg = trainer.datamodule, self.config
        tokenizer, prompts, n = datamodule.tokenizer, batch["prompt_input_ids"], self.config.num_samples
        refusal = sharded(trainer, "--model.online")
        if refusal:
            raise ValueError(f"{refusal}, which is not written yet; use DDP")
        stops = stop_ids(module.policy, tokenizer)
        repeated = [p for p in prompts for _ in range(n)]
        seed = sampling_seed(self._seed(), trainer.global_step, batch_idx % trainer.accumulate_grad_batches,
                             trainer.global_rank)
        with seeded(seed, module.device):
            config = generation_config(tokenizer, stops, cfg.max_new_tokens, do_sample=True,
                                       temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
            completions = complete(module.policy, repeated, config, module.device)
        prompt_texts, completion_texts = texts(tokenizer, repeated, completions, stops)
        finished = torch.tensor([split_completion(c, stops)[1] is not None for c in completions])
        scores = self.rewards.to(module.device)(prompt_texts, completion_texts)
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * (~finished).float()
        chosen, rejected, untied = pick_pairs(scores.view(len(prompts), n))
        keep = untied.nonzero().flatten().tolist() or [0]
        rows = [self._pair_row(datamodule, tokenizer, prompts[i], completions[i * n + chosen[i]],
                               completions[i * n + (rejected[i] if untied[i] else chosen[i])],
                               int(batch["row_ids"][i])) for i in keep]
        pairs = datamodule.collate(rows)
        if not untied.any():
            pairs["no_pairs"] = True
        self._update_metrics(module, scores.view(len(prompts), n), chosen, rejected, untied, completions, finished)
        batch.clear()  # in place, so that callbacks after the step (training/throughput.py) see what trained
        batch.update(move_data_to_device(pairs, module.device))
        self._generating += time.perf_counter() - start
        return batch

    def _seed(self) -> int:
        return self.config.seed if self.config.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    @staticmethod
    def _pair_row(datamodule, tokenizer, prompt: list[int], chosen: list[int], rejected: list[int],
                  row_id: int) -> dict:
        """Rule 3 on one pair of completions, as sampled (ids, stop token included), cut to fit."""
        hp = datamodule.hparams
        row = truncate(prompt, chosen, rejected, hp.max_length, hp.max_prompt_length, hp.truncation_mode,
                       adds_bos(tokenizer))
        return {**row, "row_id": row_id}

    @staticmethod
    def _update_metrics(module, scores: Tensor, chosen: Tensor, rejected: Tensor, untied: Tensor,
                        completions: list[list[int]], finished: Tensor) -> None:
        rows = torch.arange(len(scores))
        best, worst = scores[rows, chosen][untied], scores[rows, rejected][untied]
        values = {"objective/scores": scores.flatten(), "objective/scores_margin": best - worst,
                  "objective/scores_chosen": best, "objective/scores_rejected": worst,
                  "objective/ties": (~untied).float(),
                  "completions/mean_length": torch.tensor([float(len(c)) for c in completions]),
                  "val/contain_eos_token": finished.float()}
        for name, value in values.items():
            if value.numel():
                module.train_metrics[name].update(value.to(module.device))


