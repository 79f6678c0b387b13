"""`DPOModule` with a LoRA adapter (peft): the reference without a second copy, what trains, checkpoints.

A new adapter's reference is the policy with the adapter disabled (equal to the base model); a
pretrained adapter's reference is a frozen copy of that adapter (not the bare base); only adapter
weights train, sit in the optimizer and go into checkpoints, which reload to the same weights.
Tiny Llama saved to a temp folder (conftest.py); no network.
"""

import math

import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer, rows
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.training.logps import naive_logps
from test_architectures import tiny_model


def data_module() -> PreferenceDataModule:
    return PreferenceDataModule(dataset=rows(16), eval_dataset=rows(4), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=4)


def first_batch() -> dict[str, torch.Tensor]:
    dm = data_module()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def fit(model: DPOModule, tmp_path, max_steps: int = 3) -> L.Trainer:
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, data_module())
    return trainer


def base_logps(path: str, batch) -> torch.Tensor:
    with torch.no_grad():
        return naive_logps(AutoModelForCausalLM.from_pretrained(path), batch)[0]


def adapter_weights(model: DPOModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.policy.named_parameters() if p.requires_grad}


def test_new_adapter_reference_is_the_base_model_without_a_copy(tiny_llama):
    model = DPOModule(tiny_llama, lora_r=4, lora_target_modules=["q_proj", "v_proj", "lm_head"])
    assert model.reference is None and model.ref.adapter is None
    batch = first_batch()
    with torch.no_grad():
        for name, param in model.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # the policy moves away from the base
        policy_logps = model.scorer(model.policy, batch)[0]
    expected = base_logps(tiny_llama, batch)
    torch.testing.assert_close(model.ref.logps(model.policy, batch, "train"), expected, rtol=1e-5, atol=1e-5)
    assert (policy_logps - expected).abs().max() > 0.1
    # One model in memory: the module holds the base weights once, plus the adapter.
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    assert sum(p.numel() for p in model.parameters()) == base_params + sum(p.numel() for p in adapter_weights(model).values())


def test_only_adapter_weights_train_and_are_optimized(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, lora_r=4, learning_rate=1e-2)
    trainable = adapter_weights(model)
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.policy.named_parameters() if not p.requires_grad}
    trainer = fit(model, tmp_path)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.policy.parameters() if p.requires_grad}
    assert len(optimized) == len(trainable)
    for name, param in model.policy.named_parameters():
        if name in frozen_before:
            assert torch.equal(param, frozen_before[name]), name
    assert any(not torch.equal(p, trainable[n]) for n, p in model.policy.named_parameters() if n in trainable)


def test_checkpoint_holds_only_the_adapter_and_reloads_to_the_same_weights(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, lora_r=4, learning_rate=1e-2)
    trainer = fit(model, tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    policy_keys = {k for k in saved if k.startswith("policy.")}
    assert policy_keys == {f"policy.{n}" for n in adapter_weights(model)}
    assert set(saved) - policy_keys == {"objective.bco_reward_sum", "objective.bco_reward_count"}
    reloaded = DPOModule.load_from_checkpoint(path, weights_only=True)
    for name, value in model.policy.state_dict().items():
        torch.testing.assert_close(reloaded.policy.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_pretrained_adapter_is_copied_frozen_as_the_reference(tiny_llama, tmp_path):
    # An "SFT" adapter with non-zero B: it changes the model, so the bare base would be the wrong reference.
    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                         LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft-adapter")
    model = DPOModule(str(tmp_path / "sft-adapter"), learning_rate=1e-2)
    assert model.reference is None and model.ref.adapter == "reference"
    assert model.model_name_or_path == tiny_llama  # the tokenizer comes from the base model
    batch = first_batch()
    with torch.no_grad():
        adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "sft-adapter")
        expected = naive_logps(adapter_model, batch)[0]
    torch.testing.assert_close(model.ref.logps(model.policy, batch, "train"), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base_logps(tiny_llama, batch)).abs().max() > 0.1
    torch.testing.assert_close(model._shared_step(batch, "val"), torch.tensor(math.log(2)))  # policy == reference
    # Training moves the policy's adapter, never the reference copy, which is not optimized.
    reference_before = {n: p.detach().clone() for n, p in model.policy.named_parameters() if ".reference." in n}
    trainer = fit(model, tmp_path)
    assert reference_before and all(torch.equal(p, reference_before[n])
                                    for n, p in model.policy.named_parameters() if n in reference_before)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(".default." in n for n, p in model.policy.named_parameters() if id(p) in optimized)
    torch.testing.assert_close(model.ref.logps(model.policy, batch, "train"), expected, rtol=1e-5, atol=1e-5)
    assert all(".default." in n for n in adapter_weights(model))  # requires_grad restored after each reference pass


def test_adapter_trains_with_gradient_checkpointing(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama, lora_r=4, learning_rate=1e-2, gradient_checkpointing=True)
    before = adapter_weights(model)
    fit(model, tmp_path, max_steps=2)
    moved = [n for n, p in adapter_weights(model).items() if not torch.equal(p, before[n])]
    assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)


@pytest.mark.parametrize("kwargs, message", [
    ({"lora_r": 0}, "--model.lora_r must be > 0"),
    ({"lora_r": 4, "peft_config": {"r": 4}}, "not combined with --model.peft_config"),
    ({"lora_r": 4, "lora_dropout": 0.1}, "lora_dropout 0.1 has no effect with --model.disable_dropout true"),
    ({"logps_chunk_size": 0}, "--model.logps_chunk_size must be > 0"),
])
def test_bad_lora_arguments_fail_at_construction_naming_the_flag(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOModule(tiny_llama, **kwargs)


def test_peft_config_dict_builds_the_same_adapter(tiny_llama):
    model = DPOModule(tiny_llama, peft_config={"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"]})
    names = list(adapter_weights(model))
    assert names and all(".o_proj.lora_" in n for n in names)
    assert model.policy.peft_config["default"].r == 2 and model.reference is None


@pytest.mark.parametrize("targets", [None, "all-linear"])
@pytest.mark.parametrize("name, untouched", [("phimoe", "router"), ("llama4_text", "router"), ("mamba", "out_proj")])
def test_default_and_all_linear_targets_train_models_with_routers_and_mamba_mixers(name, untouched, targets):
    # peft's all-linear wrapped PhiMoE's and Llama-4's routers (nn.Linear subclasses whose forward returns a tuple:
    # "'tuple' object has no attribute 'dtype'" inside peft's forward) and Mamba's out_proj (refused by peft); with
    # no targets, peft has no default for these and our own error suggested all-linear.
    model = DPOModule(tiny_model(name), lora_r=4, lora_target_modules=targets, router_aux_loss_coef=0.0)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in adapter_weights(model) if ".lora_A." in n}
    assert adapted and untouched not in adapted
    batch = first_batch()
    model.eval()  # PhiMoE samples its experts in training mode (SparseMixer's Gumbel sampling)
    loss = model._shared_step(batch, "train")
    loss.backward()
    # A new adapter starts at zero (B = 0): the policy is its reference, every reward 0, the loss -log sigmoid(0).
    torch.testing.assert_close(loss.detach(), torch.tensor(math.log(2)))
    assert all(p.grad is not None for n, p in model.policy.named_parameters() if ".lora_B." in n)
