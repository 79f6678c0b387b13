"""Precomputed reference log-probs: the same training as scoring the reference every step, with one model
in memory, and a cache that a second run reads without building the reference at all.

Tiny Llamas from conftest.py; 12 training pairs in batches of 4, 6 validation pairs.
"""

import math
import os

import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer, rows
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

import dpo_lightning.training.models
import dpo_lightning.training.reference
from dpo_lightning import DPOModule, PreferenceDataModule


class ReferenceAbsent(L.Callback):
    """Records whether a reference model was held at each training step."""

    def __init__(self):
        self.held = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.held.append(module.reference is not None)


def fit(policy, root, max_steps=3, ckpt_path=None, callbacks=(), data_kwargs=None, **model_kwargs):
    L.seed_everything(0)
    model = DPOModule(policy, learning_rate=1e-2, **model_kwargs)
    data = PreferenceDataModule(dataset=rows(12), eval_dataset=rows(6), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=4, eval_batch_size=4, **(data_kwargs or {}))
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, log_every_n_steps=1,
                        enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=max_steps, check_val_every_n_epoch=None,
                        enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, {k: float(v) for k, v in trainer.callback_metrics.items()}


def assert_same_run(a, b, rel=1e-5, atol=1e-7):
    (model_a, metrics_a), (model_b, metrics_b) = a, b
    metrics_a, metrics_b = ({k: v for k, v in metrics.items() if not k.endswith("pairs_per_row")}  # packing's own
                            for metrics in (metrics_a, metrics_b))
    assert set(metrics_a) == set(metrics_b) and "val/rewards/margins" in metrics_a
    for name, value in metrics_a.items():
        assert metrics_b[name] == pytest.approx(value, rel=rel, abs=1e-6), name
    for name, weight in model_a.policy.state_dict().items():
        torch.testing.assert_close(model_b.policy.state_dict()[name], weight, rtol=rel, atol=atol)


def test_full_fine_tuning_with_the_cache_equals_scoring_the_reference_every_step(tiny_llama, tmp_path):
    # The policy scores its own starting weights before step 0: no copy is ever made.
    absent = ReferenceAbsent()
    live = fit(tiny_llama, tmp_path / "live")
    cached = fit(tiny_llama, tmp_path / "cached", callbacks=[absent], precompute_ref_log_probs=True,
                 ref_logps_cache_dir=str(tmp_path / "cache"))
    assert_same_run(live, cached)
    assert absent.held == [False] * 3
    assert len(os.listdir(tmp_path / "cache")) == 2  # one file per split
    assert cached[1]["val/rewards/margins"] != 0  # trained: the policy moved away from the reference


def test_a_second_run_with_another_beta_reads_the_cache_without_loading_the_reference(
        tiny_llama, other_llama, tmp_path, monkeypatch):
    kwargs = dict(ref_model_name_or_path=other_llama, ref_logps_cache_dir=str(tmp_path / "cache"))
    assert_same_run(fit(tiny_llama, tmp_path / "live", **{**kwargs, "ref_logps_cache_dir": None}),
                    fit(tiny_llama, tmp_path / "first", precompute_ref_log_probs=True, **kwargs))
    files = sorted(os.listdir(tmp_path / "cache"))
    load = dpo_lightning.training.models.load_causal_lm

    def policy_only(path, *args):
        assert path != other_llama, "the reference was loaded although its log-probs are cached"
        return load(path, *args)

    for module in (dpo_lightning.training.models, dpo_lightning.training.reference):
        monkeypatch.setattr(module, "load_causal_lm", policy_only)
    second = fit(tiny_llama, tmp_path / "second", precompute_ref_log_probs=True, beta=0.3, **kwargs)
    assert sorted(os.listdir(tmp_path / "cache")) == files  # read, not rescored
    monkeypatch.undo()
    assert_same_run(fit(tiny_llama, tmp_path / "live2", ref_model_name_or_path=other_llama, beta=0.3), second)


def test_lora_with_the_cache_equals_the_adapter_disabled_reference(tiny_llama, tmp_path):
    lora = dict(lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    assert_same_run(fit(tiny_llama, tmp_path / "live", **lora),
                    fit(tiny_llama, tmp_path / "cached", precompute_ref_log_probs=True,
                        ref_logps_cache_dir=str(tmp_path / "cache"), **lora))


def test_resumed_full_fine_tuning_reads_the_cache_of_its_first_run(tiny_llama, tmp_path, monkeypatch):
    # After step 2 the policy no longer holds the starting weights: the checkpoint carries the cache key.
    kwargs = dict(precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "cache"))
    straight = fit(tiny_llama, tmp_path / "straight", max_steps=4, **kwargs)
    every_2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit(tiny_llama, tmp_path / "first", max_steps=2, callbacks=[every_2], **kwargs)
    monkeypatch.setattr(dpo_lightning.training.reference, "score_reference", None)  # would fail if called
    resumed = fit(tiny_llama, tmp_path / "second", max_steps=4, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt",
                  **kwargs)
    for name, weight in straight[0].policy.state_dict().items():
        torch.testing.assert_close(resumed[0].policy.state_dict()[name], weight)


def test_precomputing_for_a_loss_without_reference_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="precompute_ref_log_probs is set but the loss uses no reference"):
        DPOModule(tiny_llama, loss_type="simpo", precompute_ref_log_probs=True)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_prefix_sharing_with_the_cache_equals_padded_batches_scored_every_step(tiny_llama, tmp_path, lora):
    # The features compose: the reference scored once on packed batches, the policy trained on them.
    kwargs = dict(lora_r=4, lora_target_modules=["q_proj", "v_proj"]) if lora else {}
    packed = fit(tiny_llama, tmp_path / "packed", precompute_ref_log_probs=True,
                 ref_logps_cache_dir=str(tmp_path / "cache"), data_kwargs=dict(prefix_sharing=True, packing=True),
                 **kwargs)
    assert 1 < packed[1]["train/pairs_per_row"] <= 4  # 4 pairs a batch, in fewer rows
    # Another summation order: Adam turns float32 rounding of near-zero gradients into ~1e-5 weight changes.
    padded = fit(tiny_llama, tmp_path / "padded", data_kwargs=dict(prefix_sharing=False), **kwargs)
    assert_same_run(padded, packed, rel=1e-4, atol=1e-4)


def data_module() -> PreferenceDataModule:
    return PreferenceDataModule(dataset=rows(12), eval_dataset=rows(6), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=4, eval_batch_size=4)


def validate(model: DPOModule) -> dict[str, float]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(model, data_module(), verbose=False)[0].items()}


def trained_checkpoint(policy, root, **model_kwargs) -> str:
    model, _ = fit(policy, root, **model_kwargs)
    path = str(root / "trained.ckpt")
    model.trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("trained_with_precompute", [False, True], ids=["live-reference", "precomputed"])
def test_a_reloaded_trained_checkpoint_validated_on_an_empty_cache_scores_the_starting_weights(
        tiny_llama, tmp_path, trained_with_precompute):
    # The trained policy is not the reference: the starting weights are reloaded from their path and scored,
    # giving the metrics of the live reference that load_from_checkpoint rebuilds without precomputation.
    kwargs = dict(precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "first")) if (
        trained_with_precompute) else {}
    path = trained_checkpoint(tiny_llama, tmp_path, **kwargs)
    live = validate(DPOModule.load_from_checkpoint(path, precompute_ref_log_probs=False, ref_logps_cache_dir=None))
    assert abs(live["val/rewards/margins"]) > 1e-3  # trained: policy and reference differ
    cache = tmp_path / "empty"
    cached = validate(DPOModule.load_from_checkpoint(path, precompute_ref_log_probs=True, ref_logps_cache_dir=str(cache)))
    assert cached.keys() == live.keys()
    for name, value in live.items():
        assert cached[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # The file written holds the starting weights' log-probs under their key: an untrained module finds it
    # (no new file) and sees a policy equal to its reference (margin 0, loss ln 2), not the trained policy.
    files = sorted(os.listdir(cache))
    fresh = validate(DPOModule(tiny_llama, precompute_ref_log_probs=True, ref_logps_cache_dir=str(cache)))
    assert sorted(os.listdir(cache)) == files
    assert fresh["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert fresh["val/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_reloaded_trained_policy_given_as_an_object_stops_and_names_the_fix(tiny_llama, tmp_path):
    path = trained_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path)
    model = DPOModule.load_from_checkpoint(path, model_name_or_path=AutoModelForCausalLM.from_pretrained(tiny_llama),
                                           precompute_ref_log_probs=True, ref_logps_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="the policy has trained.*give --model.ref_model_name_or_path"):
        validate(model)
    assert not (tmp_path / "cache").exists()  # nothing scored, nothing saved


def test_a_fully_fine_tuned_model_with_frozen_parameters_is_keyed_by_all_its_weights(tiny_llama, tmp_path):
    # Two policies sharing their frozen embeddings but not their head: each must get its own table (before,
    # the second read the first's, and its margin was the two heads' difference instead of 0).
    cache = str(tmp_path / "cache")
    for scale in (1.0, 2.0):
        policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
        policy.model.embed_tokens.requires_grad_(False)
        with torch.no_grad():
            policy.lm_head.weight.mul_(scale)
        metrics = validate(DPOModule(policy, precompute_ref_log_probs=True, ref_logps_cache_dir=cache))
        assert metrics["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # at the start, policy == reference
    assert len(os.listdir(cache)) == 2
