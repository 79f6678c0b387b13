"""`DPOModule` with tiny models saved to temp folders: the step-0 identity, the frozen reference (an
in-memory copy in the policy's dtype), checkpoints without the reference that resume to the same weights,
the Hugging Face export, bf16, and gradient checkpointing. LoRA is in test_lora.py, the lean log-probs in
test_logps.py.

Models are 2-layer Llama / GPT-2 built from configs (conftest.py); no network.
"""

import math
import warnings

import lightning as L
import pytest
import torch
from conftest import BF16_RTOL, data_module, first_batch, response_logps, rows
from conftest import quiet_trainer as trainer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_lightning import DPOModule, ExportPretrained, PreferenceDataModule
from dpo_lightning.training.scorer import Scorer


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_step_zero_loss_is_ln2_rewards_zero_accuracy_half(fixture, request):
    # GPT-2 has dropout 0.1 and the module is in train mode: equal only because dropout is disabled.
    model = DPOModule(request.getfixturevalue(fixture), beta=0.1)
    loss = model._shared_step(first_batch(data_module()), "val")
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    metrics = {name: m.compute() for name, m in model.val_metrics.items()}
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0 and metrics["rewards/margins"] == 0
    assert metrics["rewards/accuracies"] == 0.5  # ties count half, see metrics.batch_values


def test_ipo_uses_per_token_mean_log_probs(tiny_llama):
    # IPO (Azar et al., Eq. 17): (h - 1/(2 beta))^2 with h from per-token MEAN log-probs, 1/(2 beta) = 5.
    model = DPOModule(tiny_llama, loss_type="ipo", beta=0.1)
    batch = first_batch(data_module())
    with torch.no_grad():
        model.policy.lm_head.weight.mul_(4.0)  # make the policy differ from the reference
        loss = model._shared_step(batch, "val")
    (pc, pr), (rc, rr), (nc, nr) = batch_logps(model, batch)
    h = (pc / nc - pr / nr) - (rc / nc - rr / nr)
    assert h.abs().max() > 0.01  # the policy really differs, so the per-token division matters
    torch.testing.assert_close(loss, ((h - 5.0) ** 2).mean())


def test_training_moves_the_policy_and_never_the_reference(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, learning_rate=1e-2)
    before_policy = {k: v.clone() for k, v in model.policy.state_dict().items()}
    before_ref = {k: v.clone() for k, v in model.reference.state_dict().items()}
    t = trainer(tmp_path)
    t.fit(model, data_module())
    assert all(torch.equal(before_ref[k], v) for k, v in model.reference.state_dict().items())
    assert not all(torch.equal(before_policy[k], v) for k, v in model.policy.state_dict().items())
    assert not any(p.requires_grad for p in model.reference.parameters())
    optimized = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.policy.parameters()}


def test_reference_is_an_in_memory_copy_in_the_policys_dtype(tiny_llama, monkeypatch):
    loads = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or load(*a, **k))
    model = DPOModule(tiny_llama, torch_dtype="bfloat16")
    assert len(loads) == 1  # the policy only; TRL 1.16 loads the reference again from its name
    policy, reference = dict(model.policy.named_parameters()), dict(model.reference.named_parameters())
    assert policy.keys() == reference.keys()
    for name, param in reference.items():
        assert param.dtype == torch.bfloat16 and torch.equal(param, policy[name]), name
        assert param.data_ptr() != policy[name].data_ptr()  # a copy: training the policy leaves it alone


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llama):
    batch = first_batch(data_module())
    results = []
    for checkpointing in (False, True):
        model = DPOModule(tiny_llama, gradient_checkpointing=checkpointing)
        assert model.policy.model.layers[0].gradient_checkpointing == checkpointing
        results.append(perturbed_loss_and_grads(model, batch))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def perturbed_loss_and_grads(model: DPOModule, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss and policy gradients, the policy first moved off the reference so neither is trivial."""
    with torch.no_grad():
        model.policy.lm_head.weight.mul_(1.5)
    loss = model._shared_step(batch, "train")
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.policy.named_parameters()}


def test_torch_compile_compiles_both_decoders_in_place_and_gives_the_eager_step(tiny_llama, monkeypatch):
    # The eager backend traces the decoder as inductor would (guards, graph breaks), without its minute of C++
    # code generation on CPU; inductor itself is measured in docs/benchmarks.md.
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="eager", **kw))
    batch = first_batch(data_module())
    results = []
    for compiled in (False, True):
        model = DPOModule(tiny_llama, torch_compile=compiled)
        assert all((m.model._compiled_call_impl is not None) == compiled for m in (model.policy, model.reference))
        results.append(perturbed_loss_and_grads(model, batch))
    (loss, grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, loss)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_holds_only_the_policy_and_reloads_to_the_same_weights(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, learning_rate=1e-2)
    t = trainer(tmp_path)
    t.fit(model, data_module())
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    # The policy, and bco_pair's running reward mean; never the reference.
    assert {k for k in saved if not k.startswith("policy.")} == {"objective.bco_reward_sum", "objective.bco_reward_count"}
    reloaded = DPOModule.load_from_checkpoint(path, weights_only=True)
    for k, v in model.policy.state_dict().items():
        torch.testing.assert_close(reloaded.policy.state_dict()[k], v, rtol=0, atol=0)
    # The reference is rebuilt from its source: the starting weights, not the trained ones.
    start = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for k, v in start.state_dict().items():
        torch.testing.assert_close(reloaded.reference.state_dict()[k], v, rtol=0, atol=0)


def test_export_loads_with_from_pretrained(tiny_gpt2, tmp_path):
    model = DPOModule(tiny_gpt2, learning_rate=1e-2)
    dm = data_module()
    trainer(tmp_path, callbacks=[ExportPretrained(str(tmp_path / "hf"))]).fit(model, dm)
    assert (tmp_path / "hf" / "model.safetensors").exists() and not list((tmp_path / "hf").glob("*.bin"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in load_file(tmp_path / "hf" / "model.safetensors").items():
        torch.testing.assert_close(v, model.policy.state_dict()[k])
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in model.policy.parameters())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [97, 98]
    assert tokenizer.pad_token == tokenizer.eos_token  # pad = eos was set for training and saved


def test_tokenizer_defaults_to_the_models(tiny_llama, tmp_path):
    dm = PreferenceDataModule(dataset=rows(8), max_length=48, max_prompt_length=24, batch_size=4)
    trainer(tmp_path, max_steps=1).fit(DPOModule(tiny_llama), dm)
    assert dm.tokenizer.name_or_path == tiny_llama
    assert dm.train_data[0]["prompt_input_ids"][0] == dm.tokenizer.bos_token_id  # the Llama stand-in adds BOS


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "naive"])
def test_bf16_mixed_log_probs_are_float32_and_match_the_float32_run(tiny_llama, other_llama, tmp_path, lean,
                                                                     monkeypatch):
    # The policy's log-probs at the first step (the same weights and batch in both runs): float32 numbers
    # from bf16 matmuls, so equal to the float32 run's to bf16's rounding, not to float32's.
    seen = {}
    original = Scorer.__call__
    for precision in ("32-true", "bf16-mixed"):
        model = DPOModule(tiny_llama, ref_model_name_or_path=other_llama, learning_rate=1e-3, lean_logps=lean)
        seen[precision] = []
        monkeypatch.setattr(Scorer, "__call__", lambda self, m, batch, *router, out=seen[precision]: out.append(
            original(self, m, batch, *router)) or out[-1])  # the policy's pass comes first in a step
        trainer(tmp_path, max_steps=1, precision=precision).fit(model, data_module())
    (policy_32, _, tokens_32, _), (policy_bf16, _, tokens_bf16, _) = seen["32-true"][0], seen["bf16-mixed"][0]
    assert policy_bf16.dtype == torch.float32
    assert torch.equal(tokens_bf16, tokens_32)
    per_token_32, per_token_bf16 = policy_32 / tokens_32, policy_bf16 / tokens_bf16
    torch.testing.assert_close(per_token_bf16, per_token_32, rtol=BF16_RTOL, atol=0)
    assert not torch.equal(per_token_bf16, per_token_32)  # bf16 really ran


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": 0.0}, "--model.beta must be > 0"),
    ({"loss_type": "hinge", "label_smoothing": 0.1},
     r"--model.label_smoothing is set but loss_type \['hinge'\] ignores it; it is used by \[.*'sigmoid'"),
    ({"loss_type": "sigmoid", "simpo_gamma": 0.5}, r"simpo_gamma is set .* used by \['simpo'\]"),
    ({"loss_type": "kto"}, r"--model.loss_type \['kto'\] is not one of \[.*'sigmoid'"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights has 1 entries for 2 loss types"),
    ({"loss_type": ["sigmoid", "sigmoid"]}, r"--model.loss_type \['sigmoid', 'sigmoid'\] names a loss twice"),
    ({"loss_type": "simpo", "ref_model_name_or_path": "x"}, "ref_model_name_or_path is set but the loss uses no"),
])
def test_bad_arguments_fail_at_construction_naming_the_flag(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOModule(tiny_llama, **kwargs)


@pytest.mark.parametrize("kwargs", [{"loss_type": "simpo"}, {"loss_type": "orpo"}, {"loss_type": "cpo"},
                                    {"loss_type": "sigmoid", "reference_free": True}])
def test_reference_free_losses_load_no_reference(tiny_llama, kwargs):
    model = DPOModule(tiny_llama, **kwargs)
    assert model.reference is None
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.policy.parameters())
    loss = model._shared_step(first_batch(data_module()), "val")
    assert torch.isfinite(loss)


def batch_logps(model: DPOModule, batch) -> tuple[tuple, tuple, tuple]:
    """(policy chosen, rejected), (reference chosen, rejected) summed log-probs and (chosen, rejected) token
    counts, each (B,), recomputed from the models' logits by the conftest oracle."""
    (policy, n_tokens), (ref, _) = (response_logps(m, batch) for m in (model.policy, model.reference))
    return policy.chunk(2), ref.chunk(2), n_tokens.float().chunk(2)


def test_weighted_combination_and_rpo_nll_and_the_logged_total(tiny_llama):
    # loss = 1.0 * mean(sigmoid) + 0.5 * mean(sft: per-token NLL of chosen) + 0.2 * token-mean NLL of chosen,
    # with -log sigmoid(x) = log(1 + e^-x) and h = (pc - pr) - (rc - rr).
    model = DPOModule(tiny_llama, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], rpo_alpha=0.2)
    batch = first_batch(data_module())
    with torch.no_grad():
        model.policy.lm_head.weight.mul_(1.5)
        loss = model._shared_step(batch, "val")
    (pc, pr), (rc, rr), (nc, _) = batch_logps(model, batch)
    sigmoid = torch.log1p(torch.exp(-0.1 * ((pc - pr) - (rc - rr)))).mean()
    sft, nll = (-pc / nc).mean(), -pc.sum() / nc.sum()
    expected = sigmoid + 0.5 * sft + 0.2 * nll
    torch.testing.assert_close(loss, expected)
    # The logged loss is the total as trained, rpo term included; its parts are logged beside it.
    metrics = {name: metric.compute() for name, metric in model.val_metrics.items()}
    torch.testing.assert_close(metrics["loss"], expected)
    torch.testing.assert_close(metrics["loss/sigmoid"], sigmoid)
    torch.testing.assert_close(metrics["loss/sft"], sft)
    torch.testing.assert_close(metrics["nll_loss"], nll)


def test_logged_rewards_come_from_the_first_loss_that_has_rewards(tiny_llama):
    # [sft, sigmoid]: sft has no implicit reward, so rewards/* are sigmoid's, beta * (log pi - log ref), summed.
    model = DPOModule(tiny_llama, loss_type=["sft", "sigmoid"], beta=0.1)
    batch = first_batch(data_module())
    with torch.no_grad():
        model.policy.lm_head.weight.mul_(1.5)
        model._shared_step(batch, "val")
    (pc, pr), (rc, rr), _ = batch_logps(model, batch)
    metrics = {name: metric.compute() for name, metric in model.val_metrics.items()}
    torch.testing.assert_close(metrics["rewards/chosen"], (0.1 * (pc - rc)).mean())
    torch.testing.assert_close(metrics["rewards/rejected"], (0.1 * (pr - rr)).mean())


def test_bco_pair_shift_is_the_running_mean_of_all_training_rewards(tiny_llama, tmp_path):
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            (policy, _), (ref, _) = (response_logps(m, batch) for m in (module.policy, module.reference))
            seen.append(0.1 * (policy - ref))

    model = DPOModule(tiny_llama, loss_type="bco_pair", learning_rate=1e-2)
    trainer(tmp_path, max_steps=3, callbacks=[Record()]).fit(model, data_module(prefix_sharing=False))  # padded: the oracle
    expected = torch.cat(seen).double().mean()
    torch.testing.assert_close(model.objective.bco_reward_sum / model.objective.bco_reward_count, expected, rtol=1e-4, atol=1e-6)
    assert model.objective.bco_reward_count.item() == 3 * 8  # 3 steps of 4 pairs = 8 sequences each
    # A checkpoint saved before the running sums moved into `Objective` (top-level buffer names) still loads them.
    path = tmp_path / "old.ckpt"
    checkpoint = {"state_dict": {**{f"policy.{k}": v for k, v in model.policy.state_dict().items()},
                                 "bco_reward_sum": torch.tensor(6.0, dtype=torch.float64),
                                 "bco_reward_count": torch.tensor(24.0, dtype=torch.float64)},
                  "hyper_parameters": dict(model.hparams), "pytorch-lightning_version": L.__version__}
    torch.save(checkpoint, path)
    reloaded = DPOModule.load_from_checkpoint(path, weights_only=True)
    assert (reloaded.objective.bco_reward_sum.item(), reloaded.objective.bco_reward_count.item()) == (6.0, 24.0)


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sft", "sigmoid"], "ipo"], ids=["sigmoid", "sft+sigmoid", "ipo"])
def test_likelihood_displacement_warns_once_past_the_threshold(tiny_llama, other_llama, tmp_path, loss_type):
    # One step against another reference: the drop is mean(log ref(y_w) - log pi(y_w)) over the step's
    # pairs, summed log-probs per response whatever the loss (ipo's rewards are per token, sft's are zero),
    # recomputed here before the step; a threshold just under it warns, just over it does not.
    drops = []

    class Drop(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            (policy, _), (ref, _) = (response_logps(m, batch)[0].chunk(2) for m in (module.policy, module.reference))
            drops.append((ref - policy).mean().item())

    def warnings_at(threshold: float | None) -> list[str]:
        model = DPOModule(tiny_llama, ref_model_name_or_path=other_llama, chosen_logp_drop_warning=threshold,
                          loss_type=loss_type)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer(tmp_path, max_steps=1, callbacks=[Drop()]).fit(model, data_module(prefix_sharing=False))
        return [str(w.message) for w in record if "likelihood displacement" in str(w.message)]

    assert warnings_at(None) == []
    drop = drops[0]
    assert abs(drop) > 0.1  # the two models differ: a sign error in the drop would be caught
    messages = warnings_at(drop - 0.05)
    assert len(messages) == 1 and f"log-prob is {drop:.2f} nats below" in messages[0], messages
    assert warnings_at(drop + 0.05) == []

    # Warned once: a threshold under every step's drop warns at the first step only.
    model = DPOModule(tiny_llama, ref_model_name_or_path=other_llama, chosen_logp_drop_warning=-1e9)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=3).fit(model, data_module())
    assert len([w for w in record if "likelihood displacement" in str(w.message)]) == 1


def test_a_reference_model_object_is_used_as_given_and_kept_out_of_hyperparameters(tiny_llama, other_llama, tmp_path):
    # TRL's and the tutorials' way: DPOModule(model_name_or_path=model, ref_model_name_or_path=model_ref). The
    # reference here has other weights than the policy, so step 0's rewards show which model scored them.
    policy, reference = (AutoModelForCausalLM.from_pretrained(path) for path in (tiny_llama, other_llama))
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = DPOModule(model_name_or_path=policy, ref_model_name_or_path=reference, beta=0.1, learning_rate=1e-2)
    assert not [w for w in record if "nn.Module" in str(w.message)], [str(w.message) for w in record]
    assert model.reference is reference and "ref_model_name_or_path" not in model.hparams
    batch = first_batch(data_module())
    with torch.no_grad():
        model._shared_step(batch, "val")
    (pc, pr), _, _ = batch_logps(model, batch)
    rc, rr = response_logps(reference, batch)[0].chunk(2)
    rewards = model.val_metrics["rewards/chosen"].compute(), model.val_metrics["rewards/rejected"].compute()
    torch.testing.assert_close(rewards[0], (0.1 * (pc - rc)).mean())
    torch.testing.assert_close(rewards[1], (0.1 * (pr - rr)).mean())
    for metric in model.val_metrics.values():
        metric.reset()
    t = trainer(tmp_path, max_steps=2)
    t.fit(model, data_module())
    assert all(torch.equal(start[k], v) for k, v in reference.state_dict().items())

    path = tmp_path / "objects.ckpt"
    t.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"reference was passed as a model object.*ref_model_name_or_path=<the"):
        DPOModule.load_from_checkpoint(path, model_name_or_path=tiny_llama, weights_only=True)
    reloaded = DPOModule.load_from_checkpoint(path, model_name_or_path=tiny_llama, ref_model_name_or_path=other_llama,
                                              weights_only=True)
    validate = lambda m: L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,  # noqa: E731
                                   default_root_dir=tmp_path).validate(m, data_module(), verbose=False)[0]
    assert validate(reloaded) == pytest.approx(validate(model), rel=1e-6)


def test_a_reference_object_is_kept_when_its_log_probs_are_precomputed(tiny_llama, other_llama, tmp_path):
    # Precomputation drops a reference it can load again; an object could not be, so validate then fit (which
    # scores the train split later) must still score with the object, not with the policy.
    policy, reference = (AutoModelForCausalLM.from_pretrained(path) for path in (tiny_llama, other_llama))
    model = DPOModule(policy, ref_model_name_or_path=reference, precompute_ref_log_probs=True,
                      ref_logps_cache_dir=str(tmp_path / "cache"))
    t = trainer(tmp_path, max_steps=1)
    t.validate(model, data_module(), verbose=False)
    t.fit(model, data_module())
    assert model.reference is reference
    train = data_module()
    train.setup("fit")
    for batch in train.train_dataloader():  # (B, 2) [chosen, rejected] by row, from the reference object's logits
        torch.testing.assert_close(model.ref.tables["train"][batch["row_ids"]],
                                   response_logps(reference, batch)[0].view(2, -1).T, rtol=1e-5, atol=1e-5)


def test_the_policy_object_itself_as_its_reference_is_refused(tiny_llama):
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with pytest.raises(ValueError, match="ref_model_name_or_path is the policy object itself.*copy.deepcopy"):
        DPOModule(policy, ref_model_name_or_path=policy)
