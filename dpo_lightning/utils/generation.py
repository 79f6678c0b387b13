"""Generation, in one place: what stops a completion, the generation config, batched completion with the KV cache,
sampling keyed per row, a seeded block, the text a reward reads, which strategies cannot generate, and FSDP2's
weights gathered for it. `GenerateSamples`, `GreedyReward` and online DPO all complete prompts through `complete`,
so they stop on the same tokens.
"""

import contextlib
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import GenerationConfig, PreTrainedTokenizerBase
from transformers.generation import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                     TopPLogitsWarper)

from dpo_lightning.utils.hf import evaluating

# Strategies whose weights are sharded across ranks: a rank generating alone would wait forever on the others'
# shards. Under FSDP2 (ModelParallelStrategy) every rank can gather the whole weights first (`unsharded`) when
# every rank generates at once; FSDP1 and DeepSpeed would need every rank to generate in step
# (`generate(synced_gpus=True)`, untested on GPUs here).
SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def sharded(trainer: L.Trainer, who: str, every_rank: bool = False) -> str | None:
    """Why `who` cannot generate under the trainer's strategy (its weights are sharded), or None where it can.

    `every_rank`: every rank generates at the same point, inside `unsharded`, which FSDP2 allows.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, SHARDED) or every_rank and isinstance(strategy, ModelParallelStrategy):
        return None
    fix = "use DDP or FSDP2 (ModelParallelStrategy)" if every_rank else "use DDP"
    return f"{who} cannot generate under {type(strategy).__name__}: its sharded weights would need every rank to " \
           f"generate in step; {fix}"


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Within the block, an FSDP2 model holds its whole weights on every rank, so that each rank generates alone.

    Every unit gathers its weights once on entry (an all-gather each: every rank must enter together) and keeps
    them through every forward in the block, so a rank runs as many forwards as its own completions need and no
    collective at all; on exit each unit is sharded again, as it trains. As TRL's online trainer generates under
    FSDP (with the full parameters), at the cost of the whole model's memory during generation. A model not
    sharded with FSDP2 is left as it is.
    """
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    # FSDP2 reshards a unit after each forward if it was sharded with `reshard_after_forward`; that setting has no
    # public getter, so it is read from the unit's parameter groups and put back there.
    groups = [group for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups]
    kept = [group.post_forward_mesh_info for group in groups]
    for unit in units:
        unit.unshard()
    for group in groups:
        group.post_forward_mesh_info = None  # no reshard after forward: the next token's forward gathers nothing
    try:
        yield
    finally:
        for group, info in zip(groups, kept):
            group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()


def stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model's generation config's (a chat
    template's end of turn)."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys([tokenizer.eos_token_id, *(i for i in configured if i is not None)]))


def generation_config(tokenizer: PreTrainedTokenizerBase, stops: list[int], max_new_tokens: int,
                      do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int = 0) -> GenerationConfig:
    """Greedy, or sampling with these settings: a fresh config, not the model's (its defaults, such as top_k 50
    and a sampling temperature, vary by model)."""
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stops, **sampling)


class KeyedSampling(LogitsProcessor):
    """Sampling in which each row draws from its own random stream, seeded by its key, so that a row's completion
    depends on its prompt, its key and the model alone: not on the rows beside it (how many, in which order, their
    padding), nor on the rank or the number of ranks.

    The Gumbel-max trick: with G_i = -log(-log U_i), U_i uniform, argmax_i (s_i + G_i) is i with probability
    softmax(s)_i. So greedy decoding (`generation_config` without `do_sample`) of the scores plus this noise samples
    from them; each row's U are drawn from its own generator, one vector per generated token.

    Args:
        keys: one seed per row of the batch, in its order.
        device: where the scores are (each generator lives there).
    """

    def __init__(self, keys: list[int], device: torch.device):
        self.generators = [torch.Generator(device).manual_seed(key) for key in keys]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.shape[1], generator=generator, device=scores.device)
                               for generator in self.generators])  # (rows, V)
        uniform = uniform.clamp(min=torch.finfo(uniform.dtype).tiny)  # rand may give 0: log(0)
        return scores + -torch.log(-torch.log(uniform)).to(scores.dtype)


def sampling(keys: list[int], device: torch.device, temperature: float = 1.0, top_p: float = 1.0,
             top_k: int = 0) -> LogitsProcessorList:
    """The processors that sample with these settings, each row keyed (`KeyedSampling`), for `complete` with a greedy
    `generation_config`: temperature, then top_k, then top_p, as `generate` orders them when it samples."""
    warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
    return LogitsProcessorList([*warpers, KeyedSampling(keys, device)])


@torch.no_grad()
def complete(model: nn.Module, prompts: list[list[int]], config: GenerationConfig, device: torch.device,
             processors: LogitsProcessorList | None = None) -> list[list[int]]:
    """Each prompt's completion ids, through the first stop token if one came: one left-padded batch,
    in eval mode, with the KV cache (`config.use_cache`, transformers' default); `processors` (`sampling`) change
    the scores before each token is picked."""
    width = max(map(len, prompts))
    pad, stops = config.pad_token_id, set(config.eos_token_id)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with evaluating(model):
        # synced_gpus=False: no rank waits on another's generation (sharded weights are gathered or refused first).
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                             logits_processor=processors, synced_gpus=False)
    completions = []
    for ids in out[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(ids) if token in stops), len(ids))
        completions.append(ids[:end])
    return completions


def split_completion(ids: list[int], stops: list[int]) -> tuple[list[int], int | None]:
    """(the completion's ids before its stop token, the stop token or None where it was cut off)."""
    return (ids[:-1], ids[-1]) if ids and ids[-1] in stops else (ids, None)


def texts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], completions: list[list[int]],
          stops: list[int]) -> tuple[list[str], list[str]]:
    """The text a reward reads: prompts and completions decoded without special tokens (nor the stop token)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    return [decode(p) for p in prompts], [decode(split_completion(c, stops)[0]) for c in completions]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with `torch.manual_seed(seed)`, then restore the random state training had."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
