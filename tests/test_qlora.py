"""QLoRA (`DPOModule(load_in_4bit=True, lora_r=...)`): a 4-bit base (bitsandbytes), a LoRA adapter trained on
it, the reference = the adapter disabled on the same 4-bit base, and an export merged into a bf16 copy of the
base. Tiny models from conftest.py; no network.

bitsandbytes 0.50's CPU backend runs 4-bit (NF4) forward passes, so the model, the reference and the export
are tested here; training is not. After a forward in eval mode (every reference forward) it repacks the
4-bit weights for an inference kernel (`gemv_4bit`) that has no autograd formula, and backward through
the base is then silently dropped (its own warning says so): the adapter gets zero gradients. QLoRA
training is in benchmarks/gpu_check.py's `qlora` row instead.
"""

import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from test_module import data_module, first_batch
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_lightning import DPOModule
from dpo_lightning.callbacks.export import export_pretrained

bnb = pytest.importorskip("bitsandbytes")


def qlora(path: str, **kwargs) -> DPOModule:
    return DPOModule(path, load_in_4bit=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"], learning_rate=1e-2,
                     **kwargs)


def test_the_reference_is_the_adapter_disabled_on_the_same_4bit_base(tiny_llama):
    model = qlora(tiny_llama)
    assert isinstance(model.policy, PeftModel) and model.reference is None  # no second copy of the base
    projections = [m for name, m in model.policy.named_modules() if name.endswith(("q_proj.base_layer", "o_proj"))]
    assert projections and all(isinstance(m, bnb.nn.Linear4bit) for m in projections)  # quantized, adapted or not
    trainable = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # only the adapter can train
    batch = first_batch(data_module())
    with torch.no_grad():
        reference = model.ref.logps(model.policy, batch, "train")
        torch.testing.assert_close(model._sequence_logps(model.policy, batch)[0], reference)  # LoRA's B = 0
        for name, param in model.policy.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
        adapted = model._sequence_logps(model.policy, batch)[0]
        assert (adapted - reference).abs().max() > 0.1  # the adapter is on for the policy ...
        torch.testing.assert_close(model.ref.logps(model.policy, batch, "train"), reference)  # ... and off for the reference


def test_export_merges_the_adapter_into_a_bf16_copy_of_the_base(tiny_llama, tmp_path):
    # Merged: W = W_base + (alpha / r) B A, with W_base the base's own weights (not their 4-bit rounding).
    model = qlora(tiny_llama, lora_alpha=8.0)
    with torch.no_grad():
        for name, param in model.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)  # an adapter as training would leave it
    export_pretrained(model, None, tmp_path / "merged")
    assert "quantization_config" not in AutoConfig.from_pretrained(tmp_path / "merged").to_dict()
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    adapter = dict(model.policy.named_parameters())
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a = adapter[f"{prefix}.lora_A.default.weight"].float()  # (r, in)
    b = adapter[f"{prefix}.lora_B.default.weight"].float()  # (out, r)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.bfloat16
    expected = base[key].to(torch.bfloat16).float() + (8.0 / 4) * b @ a
    torch.testing.assert_close(merged[key].float(), expected, rtol=1e-2, atol=1e-2)  # bf16 rounding of the sum
    # The layers without an adapter are the base's weights, in bf16.
    key = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(merged[key], base[key].to(torch.bfloat16))


def test_without_bitsandbytes_the_error_says_what_to_install(tiny_llama, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(ImportError, match=r"pip install -e \.\[qlora\]"):
        qlora(tiny_llama)


def test_a_4bit_base_without_an_adapter_names_the_fix(tiny_llama):
    with pytest.raises(ValueError, match="--model.lora_r"):
        DPOModule(tiny_llama, load_in_4bit=True)
