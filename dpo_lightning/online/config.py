"""`OnlineConfig`: online DPO's settings, `DPOModule(online=...)` (`model.online` in YAML).

A dataclass, so LightningCLI parses each key to its type, checks it, lists it (`dpo-lightning fit --model.online.help
OnlineConfig`) and prints it (`--print_config`), and a single key can be overridden on the command line
(`--model.online.max_new_tokens 8`). From Python, a dict of the same keys (TRL-style notebooks, a checkpoint's
hyperparameters) becomes the same object through `OnlineConfig.of`, with the same checks: one code path.
"""

import importlib
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too


def _number(value: Any) -> bool:
    """A finite real number: NaN and infinity are refused by name, not met later as a NaN loss or a stuck sampler."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value: Any) -> Any:
    """numpy's scalars (a notebook's `np.int64(4)`) as Python's, so a checkpoint and its YAML hold plain data."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if _integer(value):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _reward(value: Any) -> bool:
    return isinstance(value, str) and bool(value) or callable(value)


PASSED_FROM_PYTHON = "<a function passed from Python:"  # a checkpoint's mark for a reward it cannot hold


def reward_spec(reward: str | Callable) -> str:
    """A `reward_funcs` entry as a checkpoint keeps it: a name as it is; a function as its import path where one
    imports it again (a module-level function of an importable module), else a marker naming it, which
    `load_reward` refuses, asking for the function again (a lambda, a notebook's function)."""
    if isinstance(reward, str):
        return reward
    module, name = getattr(reward, "__module__", None), getattr(reward, "__qualname__", "")
    if module and module != "__main__" and "<" not in name:
        try:
            found = importlib.import_module(module)
            for part in name.split("."):
                found = getattr(found, part)
        except Exception:
            found = None
        if found is reward:
            return f"{module}.{name}"
    return f"{PASSED_FROM_PYTHON} {getattr(reward, '__name__', type(reward).__name__)}>"


# key -> (the check, what it asks for): applied to every value, whichever way it came (CLI, YAML, a dict).
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reward_funcs": (lambda v: _reward(v) or isinstance(v, (list, tuple)) and len(v) > 0 and all(map(_reward, v)),
                     "an import path, a reward model's folder, a function, or a non-empty list of them"),
    "reward_weights": (lambda v: v is None or isinstance(v, (list, tuple)) and all(map(_number, v)),
                       "a list of finite numbers, one per reward, or null"),
    "num_samples": (lambda v: _integer(v) and v >= 2, "an integer >= 2"),
    "max_new_tokens": (lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: _number(v) and v > 0, "a finite number > 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "top_k": (lambda v: _integer(v) and v >= 0, "an integer >= 0 (0: no limit)"),
    "missing_eos_penalty": (lambda v: v is None or _number(v), "a finite number, or null"),
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
        seed: the sampling seed's base. Default: the run's `seed_everything` seed, else 42 (as the data order's).
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
        """The one check of every value, whichever way it came (the CLI builds this dataclass too)."""
        for key, (ok, wanted) in CHECKS.items():
            value = getattr(self, key)
            if not ok(value):
                raise ValueError(f"--model.online.{key} must be {wanted}; got {value!r} ({type(value).__name__})")
            setattr(self, key, _plain(value))

    @classmethod
    def plain(cls, value: "OnlineConfig | dict | None") -> dict | None:
        """The settings as a plain dict of every key, checked (`of`): what a checkpoint keeps, loadable with
        `weights_only=True` and written to hparams.yaml; a reward function as `reward_spec` names it. None stays
        None (offline)."""
        if value is None:
            return None
        settings = asdict(cls.of(value))
        funcs = settings["reward_funcs"]
        settings["reward_funcs"] = [reward_spec(f) for f in funcs] if isinstance(funcs, list) else reward_spec(funcs)
        return settings

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
