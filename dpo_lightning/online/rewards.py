"""Rewards: what a completion is worth, for online DPO's pairs (`sampler.py`) and the validation solve rate.

A reward takes the prompts and their completions (two lists of text, one prompt per completion) and returns
one float per completion. A config names each one in `reward_funcs` (TRL's name), as

- an import path, `my_module.score` or `my_module:score`: that callable, `score(prompts, completions)`;
- a local folder holding a sequence-classification model (`AutoModelForSequenceClassification`, one
  label, with its tokenizer): its logit for prompt + completion, as TRL's reward models score;

and several with `reward_weights` (TRL's name, default 1 each) score their weighted sum (`Rewards`).

A reward is the user's code, so `Rewards` checks every call before anything trains on it: one that raises, or
returns anything but one finite number per completion (a list, an array or a tensor of them; strings, None, NaN
or a wrong count are not), stops the run with our `RewardError`, naming the entry of `reward_funcs`, the
setting, the step, and the reward's own message.

The quickstart's sort task has verifiable rewards: `sort_exact` (1 if the completion is the prompt's letters
sorted, else 0: the solve rate) and `sort_closeness` (graded: the share of the answer's positions right).
"""

import importlib
import math
import numbers
import os
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_lightning.online.config import PASSED_FROM_PYTHON
from dpo_lightning.utils.locate import local, located, looks_like_path
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


class RewardError(ValueError):
    """A reward failed: it raised, or returned something other than one finite number per completion."""


def load_reward(spec: str | RewardFunc, setting: str = "reward_funcs") -> RewardFunc:
    """One reward from its config entry: a callable as it is, a folder as a `RewardModel`, else an import path.

    Whatever fails while loading it (a module that does not import, or raises as it does; no such name; a name that is
    no function; a folder that holds no reward model) is our `ValueError` naming the setting, the entry and the fix.
    """
    if callable(spec):
        return spec
    entry = f"{setting} entry {spec!r}"
    if spec.startswith(PASSED_FROM_PYTHON):
        raise ValueError(f"{entry}: this reward was a function passed from Python, which a checkpoint cannot hold; "
                         "pass it again, e.g. DPOModule.load_from_checkpoint(path, online={**settings, "
                         "'reward_funcs': [my_reward]}), or name it by import path (my_module.my_reward)")
    if looks_like_path(spec) or os.path.isdir(local(spec)):  # a reward model's folder, found as every path is
        return _reward_model(located(spec, setting, "reward"), entry)
    module_name, sep, name = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if name == "py":
        raise ValueError(f"{entry}: a Python file is named by import path: its module and function "
                         f"({module_name.replace('/', '.')}.my_reward), with the file's folder on PYTHONPATH")
    if not sep or not module_name:
        raise ValueError(f"{entry} is neither a folder nor an import path 'package.module.function'")
    fix = ("give an import path on the Python path (e.g. my_rewards.score, with its folder on PYTHONPATH) or a reward "
           "model's folder")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # not found, or the module's own code failed while importing
        raise ValueError(f"{entry}: cannot import the module {module_name!r} ({type(error).__name__}: {error}); "
                         f"{fix}") from error
    if not hasattr(module, name):
        raise ValueError(f"{entry}: the module {module_name!r} has no {name!r}; {fix}")
    reward = getattr(module, name)
    if not callable(reward):
        raise ValueError(f"{entry} is a {type(reward).__name__}, not a function of (prompts, completions)")
    return reward


def _reward_model(path: str, entry: str) -> "RewardModel":
    try:
        return RewardModel(path)
    except Exception as error:  # transformers' own errors, from deep inside its loading
        said = (str(error).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{entry}: {path} is not a reward model's folder ({type(error).__name__}: {said}); a folder "
                         "names a sequence-classification model with one label and its tokenizer "
                         "(AutoModelForSequenceClassification.save_pretrained, num_labels=1); a Python file is "
                         "named by import path (my_rewards.score, with its folder on PYTHONPATH)") from error


def read_scores(scores: Any, completions: list[str]) -> tuple[list[float], str | None]:
    """A reward's return value as one float per completion, and what is wrong with it (None: nothing).

    It must hold one finite number per completion: a list or tuple, a numpy array, or a tensor of any shape and
    dtype with that many elements, or any other iterable of numbers.
    """
    if isinstance(scores, Tensor):
        scores = scores.detach().cpu()
    if hasattr(scores, "reshape") and hasattr(scores, "tolist"):  # a tensor or an array, of any shape
        values = scores.reshape(-1).tolist()
    elif isinstance(scores, Iterable) and not isinstance(scores, (str, bytes, dict)):
        values = list(scores)
    else:
        return [], f"returned a {type(scores).__name__}, not one number per completion"
    if len(values) != len(completions):
        return [], f"returned {len(values)} scores for {len(completions)} completions"
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real):
            return [], f"returned {value!r} ({type(value).__name__}) for completion {i}, not a number"
        if not math.isfinite(value):
            return [], f"returned {value} for completion {i} ({completions[i]!r}), not a finite number"
    return [float(value) for value in values], None


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
        self.funcs = [load_reward(spec, setting) for spec in specs]
        # Each entry as the config names it, for errors.
        self.names = [spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec)) for spec in specs]

    def to(self, device: torch.device) -> "Rewards":
        for func in self.funcs:
            if isinstance(func, RewardModel):
                func.to(device)
        return self

    def __call__(self, prompts: list[str], completions: list[str], where: str = "when called") -> Tensor:
        """The weighted sum of every reward per completion, (N,) float64 on the CPU: ranked as the rewards returned
        them (1.0 and 1.0 + 1e-9, or 16777216 and 16777217, are one float32).

        Raises `RewardError` naming the entry, the setting and `where` (e.g. "at training step 3") when a reward
        raises or returns anything but one finite number per completion.
        """
        total = torch.zeros(len(completions), dtype=torch.float64)
        for func, weight, name in zip(self.funcs, self.weights, self.names):
            entry = f"{self.setting} entry {name!r}"
            try:
                scores = func(prompts, completions)
            except (Exception, SystemExit) as error:  # sys.exit() in a reward is its failure, not the run's end
                raise RewardError(f"{entry} raised {where}: {type(error).__name__}: {error}. Nothing was trained "
                                  "on these completions; fix the reward or remove it from the list") from error
            values, problem = read_scores(scores, completions)
            if problem:
                raise RewardError(f"{entry} {problem} {where}. Nothing was trained on these completions; a reward "
                                  "takes the prompts and completions (two lists of text) and returns one finite "
                                  "float per completion")
            total += weight * torch.tensor(values, dtype=torch.float64)
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
