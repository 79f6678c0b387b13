"""Online DPO as a user meets it from a notebook or a config (online/config.py, online/rewards.py, data/prompts.py,
training/reference.py's sync refusal): the settings' one check, rewards ranked at their own resolution, a reward
that exits, a reward that cannot load, a reward function in a checkpoint, prompts whose text holds special tokens,
the prompt a reward reads, and the step's loss as the mean over all its pairs under gradient accumulation.

Tiny Llama and the ASCII tokenizer from conftest.py; no network. Rewards are plain functions of this module, named
by import path (`test_online_settings.<name>`) or passed as objects.
"""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import BOS, ascii_tokenizer, data_module, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from dpo_lightning import DPOModule, OnlineConfig
from dpo_lightning.data.prompts import prepare_prompts
from dpo_lightning.online.rewards import RewardError, Rewards
from dpo_lightning.online.sampler import pick_pairs

ROOT = Path(__file__).resolve().parents[1]
ONLINE = {"reward_funcs": "test_online_settings.length_reward", "num_samples": 3, "max_new_tokens": 6}
SEEN: list[list[str]] = []


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    SEEN.append(list(prompts))
    return [float(len(c)) for c in completions]


def some_prompts_tie(prompts: list[str], completions: list[str]) -> list[float]:
    """Every completion of a prompt ending in '!' scores 1 (the prompt ties); others score their length."""
    return [1.0 if p.endswith("!") else float(len(c)) for p, c in zip(prompts, completions)]


# 8 prompts, 4 of which tie (those ending in '!'): as 2 micro-batches of 4, or on 2 ranks of 4, they hold 1
# and 3 pairs.
TYING_PROMPTS = [f"Q{i}: say {'ab' * (i % 3 + 1)}{'!' if i in (0, 2, 4, 5) else '?'}" for i in range(8)]


def tying_run(policy: str, batch_size: int) -> tuple[DPOModule, L.LightningDataModule]:
    """Plain SGD (the weights move by exactly -lr x the gradient) on `TYING_PROMPTS`, ranked by `some_prompts_tie`."""
    model = DPOModule(policy, learning_rate=0.5, optimizer={"class_path": "torch.optim.SGD"},
                      online={**ONLINE, "reward_funcs": "test_online_settings.some_prompts_tie"})
    return model, data_module(dataset={"prompt": TYING_PROMPTS}, eval_n=0, max_length=32, max_prompt_length=16,
                              batch_size=batch_size, prefix_sharing=False, seed=42)  # the order the tied rows assume


def test_bad_values_are_refused_by_name_from_python_as_on_the_command_line_and_numpy_integers_are_integers():
    # The command line's parser refuses "nan" and "inf" for a float itself; a notebook's values meet __post_init__.
    for key, value in (("temperature", math.nan), ("temperature", math.inf), ("top_p", math.nan),
                       ("missing_eos_penalty", math.nan), ("reward_weights", [math.inf]),
                       ("max_new_tokens", True), ("num_samples", 2.0)):
        with pytest.raises(ValueError, match=f"--model.online.{key} must be"):
            OnlineConfig(**{**ONLINE, key: value})
    config = OnlineConfig(**{**ONLINE, "num_samples": np.int64(4), "max_new_tokens": np.int32(8),
                             "temperature": np.float32(0.5), "reward_weights": [np.int64(2)]})
    assert (config.num_samples, config.max_new_tokens, config.temperature, config.reward_weights) == (4, 8, 0.5, [2.0])
    assert [type(v) for v in (config.num_samples, config.max_new_tokens, config.temperature)] == [int, int, float]
    assert type(config.reward_weights[0]) is int  # plain data: a checkpoint loads with weights_only=True


def test_rewards_are_ranked_at_their_own_resolution():
    # 1.0 and 1.0 + 1e-9 are one float32 (its spacing at 1 is 1.2e-7), and so are 16777216 and 16777217 (2^24 + 1).
    for low, high in ((1.0, 1.0 + 1e-9), (16777216, 16777217)):
        scores = Rewards(lambda p, c, low=low, high=high: [low, high, low])(["p"] * 3, ["a", "b", "c"])
        chosen, rejected, untied = pick_pairs(scores.view(1, 3))
        assert untied.tolist() == [True] and chosen.tolist() == [1] and rejected.tolist() == [0]


def test_a_reward_that_exits_is_a_reward_error_naming_it_and_the_step():
    def exits(prompts, completions):
        sys.exit("scorer gave up")

    with pytest.raises(RewardError, match=r"--model.online.reward_funcs entry 'exits' raised at training step 3: "
                                          r"SystemExit: scorer gave up"):
        Rewards([exits], setting="--model.online.reward_funcs")(["p"], ["c"], "at training step 3")


def test_a_reward_that_cannot_load_is_named_with_the_setting_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('needs a GPU')\n")
    (tmp_path / "plain_rewards.py").write_text("THRESHOLD = 3\n")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "notes.txt").write_text("hello")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    setting = "--model.online.reward_funcs"
    for spec, says in (("broken_rewards.score", "cannot import the module 'broken_rewards' (RuntimeError: needs a GPU)"),
                       ("plain_rewards.score", "the module 'plain_rewards' has no 'score'"),
                       ("plain_rewards.THRESHOLD", "is a int, not a function"),
                       ("not_a_model", "is not a reward model's folder"),
                       ("plain_rewards.py", "a Python file is named by import path")):
        with pytest.raises(ValueError) as error:
            Rewards(spec, setting=setting)
        assert f"{setting} entry {spec!r}" in str(error.value) and says in str(error.value), str(error.value)


def test_special_tokens_typed_in_a_prompt_stay_text(tiny_llama):
    # "</s>" is the ASCII tokenizer's EOS (id 2): typed in a text prompt it is five characters, as in preference rows.
    tokenizer = ascii_tokenizer(add_bos=True)
    prompt = "say </s> and <s> please"
    out = prepare_prompts({"prompt": [prompt]}, [0], "explicit", tokenizer, BOS, 64, "keep_end")
    assert out["prompt_input_ids"][0] == [BOS] + [ord(c) for c in prompt]  # BOS, then the characters
    assert out["prompt_input_ids"][0] == [BOS] + tokenizer(prompt, add_special_tokens=False,
                                                           split_special_tokens=True)["input_ids"]


def test_a_reward_reads_the_prompt_as_written_while_the_policy_completes_the_cut_one(tiny_llama, tmp_path):
    SEEN.clear()
    prompts = [f"Q{i}: " + "long question " * 4 + "?" for i in range(8)]  # 62 characters each, over 16 tokens
    L.seed_everything(0)
    model = DPOModule(tiny_llama, learning_rate=1e-3, online=ONLINE)
    data = data_module(dataset={"prompt": prompts}, eval_n=0, max_length=32, max_prompt_length=16)
    quiet_trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(model, data)
    assert data.summary["train"]["truncated"] == 8  # the policy saw 16 tokens of each
    seen = [p for call in SEEN for p in call]
    assert len(seen) == 2 * 4 * 3 and set(seen) <= set(prompts)


@pytest.mark.parametrize("options, says", [
    ({"lora_r": 4}, "with LoRA the reference is the adapter switched off"),
    ({"reference_free": True}, "the loss takes no reference"),
    ({"loss_type": "simpo"}, "the loss takes no reference"),
    ({"precompute_ref_log_probs": True}, "--model.precompute_ref_log_probs cannot precompute online pairs"),
])
def test_ref_model_sync_steps_refusal_names_the_setting_the_value_and_the_fix(tiny_llama, options, says):
    with pytest.raises(ValueError) as error:
        DPOModule(tiny_llama, online={**ONLINE, "ref_model_sync_steps": 2}, **options)
    message = str(error.value)
    assert says in message, message
    if "precompute" not in says:
        assert "--model.online.ref_model_sync_steps is 2" in message and "remove ref_model_sync_steps" in message


def test_a_reward_function_from_a_notebook_checkpoints_reloads_and_resumes(tiny_llama, tmp_path):
    def fit(online, root, ckpt_path=None, steps=2):
        L.seed_everything(0)
        model = DPOModule(tiny_llama, learning_rate=1e-3, online=online)
        every = ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1)
        quiet_trainer(tmp_path, max_steps=steps, callbacks=[every]).fit(
            model, data_module(8, eval_n=0, max_length=32, max_prompt_length=16), ckpt_path=ckpt_path)
        return model

    # A module-level function: kept by its import path, rebuilt on load.
    fit({**ONLINE, "reward_funcs": [length_reward]}, tmp_path / "named")
    loaded = DPOModule.load_from_checkpoint(tmp_path / "named" / "epoch=0-step=2.ckpt")
    assert loaded.online.rewards.funcs == [length_reward]
    assert loaded.hparams["online"]["reward_funcs"] == ["test_online_settings.length_reward"]
    # A lambda: the checkpoint names it and asks for it again; given again, it loads and the run resumes.
    shorter = lambda prompts, completions: [-float(len(c)) for c in completions]  # noqa: E731
    fit({**ONLINE, "reward_funcs": shorter}, tmp_path / "lambda")
    path = tmp_path / "lambda" / "epoch=0-step=1.ckpt"
    with pytest.raises(ValueError, match=r"--model.online.reward_funcs entry '<a function passed from Python: "
                                         r"<lambda>>'.*pass it again"):
        DPOModule.load_from_checkpoint(path)
    again = DPOModule.load_from_checkpoint(path, online={**ONLINE, "reward_funcs": shorter})
    assert again.online.rewards.funcs == [shorter]
    resumed = fit({**ONLINE, "reward_funcs": shorter}, tmp_path / "resumed", ckpt_path=path, steps=3)
    assert resumed.trainer.global_step == 3


def test_accumulating_two_micro_batches_trains_as_one_batch_of_both_when_their_pair_counts_differ(tiny_llama,
                                                                                                   tmp_path):
    # One optimizer step on 8 prompts, half of which tie (those ending in '!'); plain SGD, so the weights move by
    # exactly -lr x the gradient: the mean over the step's pairs, however the prompts are split into micro-batches.
    pairs_per_batch, trained = [], []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            pairs_per_batch[-1].append(len(outputs["batch"]["row_ids"]))

    for batch_size, accumulate in ((8, 1), (4, 2)):
        L.seed_everything(0)
        pairs_per_batch.append([])
        model, data = tying_run(tiny_llama, batch_size)
        quiet_trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate, callbacks=[Count()],
                      enable_checkpointing=False).fit(model, data)
        trained.append({k: v.clone() for k, v in model.policy.state_dict().items()})
    assert pairs_per_batch[0] == [4] and sorted(pairs_per_batch[1]) == [1, 3]  # uneven: 1 pair beside 3
    for name, weight in trained[0].items():
        torch.testing.assert_close(trained[1][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_two_ddp_ranks_with_uneven_pair_counts_train_as_one_process(tiny_llama, tmp_path):
    # One optimizer step on the 8 prompts: one process with all 8, or 2 gloo ranks with 4 each, whose pair counts
    # differ (1 and 3). The step's loss is the mean over its 4 pairs, whichever rank holds them.
    for devices in (1, 2):
        subprocess.run([sys.executable, __file__, tiny_llama, str(tmp_path / f"{devices}.pt"), str(devices)],
                       check=True, timeout=600, cwd=tmp_path)
    single, ranks = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in (1, 2))
    assert single["pairs"] == [4] and sorted(ranks["pairs"]) == [1, 3]
    start = DPOModule(tiny_llama).policy.state_dict()
    assert any(not torch.equal(single["weights"][k], start[k]) for k in start)
    for name, weight in single["weights"].items():
        torch.testing.assert_close(ranks["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_the_quickstart_resumed_from_the_command_line_with_a_changed_setting_names_that_setting_alone(tmp_path,
                                                                                                     monkeypatch):
    from dpo_lightning.cli.main import cli_main

    monkeypatch.chdir(tmp_path)  # the quickstart's logs and export go here
    quickstart = ["fit", "--config", str(ROOT / "configs" / "online_quickstart.yaml"), "--trainer.limit_val_batches",
                  "0", "--trainer.num_sanity_val_steps", "0", "--data.batch_size", "4"]
    cli_main([*quickstart, "--trainer.max_steps", "1", "--trainer.callbacks+=ModelCheckpoint",
              "--trainer.callbacks.dirpath", "ckpt", "--trainer.callbacks.every_n_train_steps", "1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = cli_main([*quickstart, "--trainer.max_steps", "2", "--ckpt_path", "ckpt/epoch=0-step=1.ckpt",
                        "--model.online.max_new_tokens", "8"])
    assert cli.trainer.global_step == 2 and cli.model.online.config.max_new_tokens == 8
    said = [str(w.message) for w in caught if "other settings" in str(w.message)]
    assert len(said) == 1 and "'max_new_tokens': 10" in said[0] and "'max_new_tokens': 8" in said[0], said
    listed = said[0].split("other settings: ")[1].split(". The run's")[0]
    assert listed.startswith("online {") and "_instantiator" not in listed and "class_path" not in listed, listed


if __name__ == "__main__":
    policy, out, devices = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    pairs = []

    class Pairs(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            pairs.append(len(outputs["batch"]["row_ids"]))

    L.seed_everything(0)
    model, data = tying_run(policy, 8 // devices)
    trainer = quiet_trainer(out.parent, max_steps=1, accelerator="cpu", devices=devices,
                            strategy="ddp" if devices > 1 else "auto", callbacks=[Pairs()], enable_checkpointing=False)
    trainer.fit(model, data)
    everything = [None] * devices
    if devices > 1:
        torch.distributed.all_gather_object(everything, pairs)
    if trainer.is_global_zero:
        torch.save({"weights": model.policy.state_dict(), "pairs": sum(everything, []) if devices > 1 else pairs},
                   out)
