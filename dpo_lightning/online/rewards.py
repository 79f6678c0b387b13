"""Rewards: what a completion is worth, for online DPO's pairs (`online.py`) and the validation solve rate.

A reward takes the prompts and their completions (two lists of text, one prompt per completion) and returns
one float per completion. A config names each one in `reward_funcs` (TRL's name), as

- an import path, `my_module.score` or `my_module:score`: that callable, `score(prompts, completions)`;
- a local folder holding a sequence-classification model (`AutoModelForSequenceClassification`, one
  label, with its tokenizer): its logit for prompt + completion, as TRL's reward models score;

and several with `reward_weights` (TRL's name, default 1 each) score their weighted sum (`Rewards`).

The quickstart's sort task has verifiable rewards: `sort_exact` (1 if the completion is the prompt's letters
sorted, else 0: the solve rate) and `sort_closeness` (graded: the share of the answer's positions right).
"""

import importlib
import os
from typing import Callable, Sequence

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_lightning.utils.tokenizers import with_pad_token

RewardFunc = Callable[[list[str], list[str]], Sequence[float]]


class RewardModel:
    """A sequence-classification model from a local folder, as a reward: its logit for prompt + completion.

    Loaded in float32 on the CPU, in eval mode and frozen (`trust_remote_code=False`); `to` moves it.
    """

    def __init__(self, path: str, batch_size: int = 32):
        self.tokenizer = with_pad_token(AutoTokenizer.from_pretrained(path, trust_remote_code=False), need_eos=False)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=False).eval()
        self.model.requires_grad_(False)
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path}: {self.model.config.num_labels} labels; a reward model has one "
                             "(AutoModelForSequenceClassification.from_pretrained(..., num_labels=1))")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # how it finds each row's last token
        self.path, self.batch_size = path, batch_size
        self.__name__ = os.path.basename(os.path.normpath(path))

    def to(self, device: torch.device) -> "RewardModel":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [p + c for p, c in zip(prompts[start:start + self.batch_size],
                                           completions[start:start + self.batch_size])]
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.model.device)
            scores += self.model(**inputs).logits[:, 0].float().tolist()
        return scores


def load_reward(spec: str | RewardFunc) -> RewardFunc:
    """One reward from its config entry: a callable as it is, a folder as a `RewardModel`, else an import path."""
    if callable(spec):
        return spec
    if os.path.isdir(spec):
        return RewardModel(spec)
    module_name, sep, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not sep or not module_name:
        raise ValueError(f"reward {spec!r}: neither a folder nor an import path 'package.module.function'")
    try:
        reward = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"reward {spec!r}: cannot import {name!r} from {module_name!r} ({error}); give an import "
                         "path on the Python path (e.g. my_rewards.score) or a reward model's folder") from None
    if not callable(reward):
        raise ValueError(f"reward {spec!r} is a {type(reward).__name__}, not a function of (prompts, completions)")
    return reward


class Rewards:
    """The weighted sum of one or more rewards (`reward_funcs`, `reward_weights`), checked on every call.

    Args:
        reward_funcs: one entry or a list (see the module docstring).
        reward_weights: one weight per reward; default 1 each.
        setting: the config key, named in errors (e.g. "--model.online.reward_funcs").
    """

    def __init__(self, reward_funcs: str | RewardFunc | list, reward_weights: list[float] | None = None,
                 setting: str = "reward_funcs"):
        specs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not specs:
            raise ValueError(f"{setting}: no reward given; name at least one (an import path or a folder)")
        self.weights = list(reward_weights) if reward_weights is not None else [1.0] * len(specs)
        if len(self.weights) != len(specs):
            raise ValueError(f"{setting}: {len(specs)} rewards but {len(self.weights)} reward_weights; give one "
                             "weight per reward")
        self.setting = setting
        self.funcs = [load_reward(spec) for spec in specs]

    def to(self, device: torch.device) -> "Rewards":
        for func in self.funcs:
            if isinstance(func, RewardModel):
                func.to(device)
        return self

    def __call__(self, prompts: list[str], completions: list[str]) -> Tensor:
        """The weighted sum of every reward per completion, (N,) float32 on the CPU."""
        total = torch.zeros(len(completions))
        for func, weight in zip(self.funcs, self.weights):
            scores = torch.as_tensor(list(func(prompts, completions)), dtype=torch.float32).flatten()
            name = getattr(func, "__name__", repr(func))
            if len(scores) != len(completions) or not torch.isfinite(scores).all():
                raise ValueError(f"{self.setting}: reward {name} returned {len(scores)} scores for "
                                 f"{len(completions)} completions (or a non-finite one): return one finite float "
                                 "per completion")
            total += weight * scores
        return total


# --- The quickstart's sort task: its text format (the quickstart's assets are written in it) and its rewards. ---

def format_prompt(letters: str) -> str:
    return f"sort {letters}:"


def format_response(letters: str) -> str:
    # The leading space separates answer from prompt, as in " abcdf"; it is part of the response.
    return f" {letters}"


def prompt_letters(prompt: str) -> str:
    """Inverse of `format_prompt`: "sort dfbca:" -> "dfbca"."""
    return prompt.removeprefix("sort ").removesuffix(":")




def sorted_answer(prompt: str) -> str:
    """The sort task's right answer to a prompt: "sort dfbca:" -> " abcdf"."""
    return format_response("".join(sorted(prompt_letters(prompt))))


def sort_exact(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where the completion is exactly the prompt's letters sorted (" abcdf"), else 0.0: the solve rate."""
    return [float(completion == sorted_answer(prompt)) for prompt, completion in zip(prompts, completions)]


def sort_closeness(prompts: list[str], completions: list[str]) -> list[float]:
    """How close each completion is to sorted: the share of positions holding the right character, over the
    longer of answer and completion (1.0 exactly when sorted; extra or missing characters count as wrong)."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        answer = sorted_answer(prompt)
        right = sum(a == c for a, c in zip(answer, completion))
        scores.append(right / max(len(answer), len(completion)))
    return scores
