"""`OnlineConfig`: online DPO's settings, `DPOModule(online=...)` (`model.online` in YAML).

A dataclass, so LightningCLI parses each key to its type, checks it, lists it (`dpo-lightning fit --model.online.help
OnlineConfig`) and prints it (`--print_config`), and a single key can be overridden on the command line
(`--model.online.max_new_tokens 8`). From Python, a dict of the same keys (TRL-style notebooks, a checkpoint's
hyperparameters) becomes the same object through `OnlineConfig.of`, with the same checks: one code path.
"""

import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _reward(value: Any) -> bool:
    return isinstance(value, str) and bool(value) or callable(value)


# key -> (the check, what it asks for): applied to every value, whichever way it came (CLI, YAML, a dict).
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reward_funcs": (lambda v: _reward(v) or isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_reward, v)),
                     "an import path, a reward model's folder, a function, or a non-empty list of them"),
    "reward_weights": (lambda v: v is None or isinstance(v, (list, tuple)) and all(map(_number, v)),
                       "a list of numbers, one per reward, or null"),
    "num_samples": (lambda v: _integer(v) and v >= 2, "an integer >= 2"),
    "max_new_tokens": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _number(v) and v > 0, "a number > 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no limit)"),
    "missing_eos_penalty": (lambda v: v is None or _number(v), "a number, or null"),
    "ref_model_sync_steps": (lambda v: v is None or _integer(v) and v >= 1, "an integer >= 1, or null"),
    "seed": (lambda v: v is None or _integer(v), "an integer, or null"),
}


@dataclass
class OnlineConfig:
    """Online DPO's settings (docs/online.md); TRL's names where TRL has one.

    Args:
        reward_funcs: the reward: an import path (`my_module.score`), a reward model's folder, or a list of
            them (`online/rewards.py`); from Python, functions too.
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
        for key, (ok, wanted) in CHECKS.items():
            value = getattr(self, key)
            if not ok(value):
                raise ValueError(f"--model.online.{key} must be {wanted}; got {value!r} ({type(value).__name__})")

    @classmethod
    def plain(cls, value: "OnlineConfig | dict | None") -> dict | None:
        """The settings as a plain dict of every key, checked (`of`): what a checkpoint keeps, loadable with
        `weights_only=True`. None stays None (offline)."""
        return None if value is None else asdict(cls.of(value))

    @classmethod
    def of(cls, value: "OnlineConfig | dict") -> "OnlineConfig":
        """The settings from an `OnlineConfig` or a dict of its keys (each checked; an unknown key is named)."""
        if isinstance(value, cls):
            return value
        names = [f.name for f in fields(cls)]
        if not isinstance(value, dict):
            raise TypeError(f"--model.online must be an OnlineConfig or a dict of its keys {names}; got a "
                            f"{type(value).__name__}")
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"--model.online: unknown key(s) {unknown}; the keys are {names}")
        if "reward_funcs" not in value:
            raise ValueError("--model.online needs reward_funcs: an import path (my_module.score), a reward model's "
                             "folder, or a list of them")
        return cls(**value)
