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
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from datasets import Dataset, IterableDataset, LargeList, List
from torchmetrics import MeanMetric
from transformers import GenerationConfig, PreTrainedTokenizerBase

from dpo_lightning.callbacks import SHARDED, seeded
from dpo_lightning.rules import adds_bos, encode, truncate, with_bos
from dpo_lightning.sources import STAGE_NAMES
from dpo_lightning.models import evaluating
from dpo_lightning.resume import ends_optimizer_step
from dpo_lightning.rewards import Rewards

METRICS = ("objective/scores", "objective/scores_margin", "objective/scores_chosen", "objective/scores_rejected",
           "objective/ties", "completions/mean_length", "val/contain_eos_token")


@dataclass
class OnlineConfig:
    """`model.online`'s keys (see the README's "Online DPO"). TRL's names where TRL has one.

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


def prompt_format(rows: Dataset | IterableDataset, tokenizer: PreTrainedTokenizerBase, stage: str) -> str:
    """A prompt-only split's format: "conversational" for messages (needs a chat template), else "explicit"."""
    feature = (rows.features or {}).get("prompt")
    if not isinstance(feature, (List, LargeList)):
        return "explicit"
    if not tokenizer.chat_template:
        raise ValueError(f"{STAGE_NAMES[stage]} prompts are conversations but the tokenizer has no chat_template: "
                         "use a chat model's tokenizer, or set tokenizer.chat_template before training")
    return "conversational"


def prepare_prompts(batch: dict[str, list], indices: list[int], dataset_format: str,
                    tokenizer: PreTrainedTokenizerBase, bos_token_id: int | None, **unused) -> dict[str, list]:
    """Rules 1-2 for prompt-only rows (a batched `datasets.map` function, as `rules.prepare_rows`), as `PREPARED`
    rows with no responses: a conversation rendered with `add_generation_prompt=True`, one BOS, no special
    tokens. A missing, non-text or empty prompt is dropped and counted. Rule 3 applies once the pair exists."""
    prompts, reasons = [], []
    for prompt, issue in zip(batch["prompt"], batch.get("source_issue") or [""] * len(indices)):
        ok = isinstance(prompt, list if dataset_format == "conversational" else str)
        reasons.append(issue or ("missing prompt" if prompt is None else "" if ok else
                                 f"not {'messages' if dataset_format == 'conversational' else 'text'} prompt"))
        if ok and dataset_format == "conversational":
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompts.append(prompt if ok else "")
    ids = [with_bos(p, bos_token_id) for p in encode(tokenizer, prompts)]
    reasons = [reason or ("" if p else "empty prompt") for reason, p in zip(reasons, ids)]
    ids = [p if not reason else [] for p, reason in zip(ids, reasons)]
    n = len(indices)
    return {"row_id": indices, "drop_reason": reasons, "prompt_input_ids": ids, "chosen_input_ids": [[]] * n,
            "rejected_input_ids": [[]] * n, "length": [len(p) for p in ids], "truncated": [False] * n,
            "chosen_longer": [False] * n}


def collate_prompts(rows: list[dict]) -> dict:
    """Prompt-only rows as a batch: their `prompt_input_ids` (lists, unpadded) and `row_ids` (B,)."""
    return {"prompt_input_ids": [row["prompt_input_ids"] for row in rows],
            "row_ids": torch.tensor([row["row_id"] for row in rows])}


def stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model's generation config's (a chat
    template's end of turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys([tokenizer.eos_token_id, *(i for i in configured if i is not None)]))


@torch.no_grad()
def complete(model: nn.Module, prompts: list[list[int]], config: GenerationConfig,
             device: torch.device) -> list[list[int]]:
    """Each prompt's completion ids, through the first stop token if one came: one left-padded batch,
    in eval mode, with the KV cache (`config.use_cache`, transformers' default)."""
    width = max(map(len, prompts))
    pad, stops = config.pad_token_id, set(config.eos_token_id)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with evaluating(model):
        # synced_gpus=False: no rank waits on another's generation (sharded weights are refused before this).
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             synced_gpus=False)
    completions = []
    for ids in out[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(ids) if token in stops), len(ids))
        completions.append(ids[:end])
    return completions


def generation_config(tokenizer: PreTrainedTokenizerBase, stops: list[int], max_new_tokens: int,
                      sample: OnlineConfig | None = None) -> GenerationConfig:
    """Greedy, or sampling with `sample`'s settings: a fresh config, not the model's (its defaults vary by model)."""
    sampling = dict(do_sample=True, temperature=sample.temperature, top_p=sample.top_p,
                    top_k=sample.top_k) if sample else dict(do_sample=False)
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stops, **sampling)


def split_completion(ids: list[int], stops: list[int]) -> tuple[list[int], int | None]:
    """(the completion's ids before its stop token, the stop token or None where it was cut off)."""
    return (ids[:-1], ids[-1]) if ids and ids[-1] in stops else (ids, None)


def texts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], completions: list[list[int]],
          stops: list[int]) -> tuple[list[str], list[str]]:
    """The text a reward reads: prompts and completions decoded without special tokens (nor the stop token)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return [decode(p) for p in prompts], [decode(split_completion(c, stops)[0]) for c in completions]


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
        if isinstance(trainer.strategy, SHARDED):
            raise ValueError(f"--model.online under {type(trainer.strategy).__name__}: sharded weights would need "
                             "every rank to generate in step, which is not written yet; use DDP")
        stops = stop_ids(module.policy, tokenizer)
        repeated = [p for p in prompts for _ in range(n)]
        seed = sampling_seed(self._seed(), trainer.global_step, batch_idx % trainer.accumulate_grad_batches,
                             trainer.global_rank)
        with seeded(seed, module.device):
            completions = complete(module.policy, repeated, generation_config(tokenizer, stops, cfg.max_new_tokens,
                                                                              cfg), module.device)
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
        batch.clear()  # in place, so that callbacks after the step (throughput.py) see what trained
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


class GreedyReward(L.Callback):
    """At every validation (the sanity check's too), the mean reward of the policy's greedy completions of
    every validation prompt, logged as `val/<name>` (default `val/reward/greedy`; the quickstart's solve rate).

    Under DDP each rank completes every `world_size`-th prompt and one all-reduce sums the scores.

    Args:
        reward_funcs: the reward(s), as `model.online.reward_funcs` names them (`rewards.py`).
        reward_weights: one weight per reward; default 1 each.
        max_new_tokens: tokens generated per completion at most.
        batch_size: prompts per `generate` call.
        name: the metric's name after `val/`.
    """

    def __init__(self, reward_funcs: str | list[str], reward_weights: list[float] | None = None,
                 max_new_tokens: int = 32, batch_size: int = 256, name: str = "reward/greedy"):
        self.rewards = Rewards(reward_funcs, reward_weights, "GreedyReward.reward_funcs")
        self.max_new_tokens, self.batch_size, self.name = max_new_tokens, batch_size, name

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, SHARDED):
            rank_zero_warn(f"GreedyReward is skipped under {type(trainer.strategy).__name__}: sharded weights "
                           "would need every rank to generate", category=UserWarning)
            return
        datamodule = trainer.datamodule
        if getattr(datamodule, "val_data", None) is None:
            return
        prompts = list(datamodule.val_data["prompt_input_ids"])[trainer.global_rank::trainer.world_size]
        total = torch.zeros(2, dtype=torch.float64, device=pl_module.device)  # (score sum, count)
        if prompts:
            tokenizer = datamodule.tokenizer
            stops = stop_ids(pl_module.policy, tokenizer)
            config = generation_config(tokenizer, stops, self.max_new_tokens)
            completions = sum((complete(pl_module.policy, prompts[i:i + self.batch_size], config, pl_module.device)
                               for i in range(0, len(prompts), self.batch_size)), [])
            scores = self.rewards.to(pl_module.device)(*texts(tokenizer, prompts, completions, stops))
            total += torch.tensor([scores.sum().item(), len(scores)], dtype=torch.float64, device=total.device)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        pl_module.log(f"val/{self.name}", (total[0] / total[1]).float())

