"""FSDP's pieces that run on CPU: the decoder-layer policy (`distributed.DecoderLayers`) that configs/fsdp.yaml
gives `FSDPStrategy` for wrapping and for activation checkpointing. Tiny models from conftest.py; no network.

Sharded training itself needs GPUs: Lightning's `FSDPStrategy` refuses `accelerator="cpu"`, and torch 2.13's
FSDP1 refuses a CPU-only process (see docs/multi_gpu_section.md for the exact errors), so no 2-process
FSDP run is compared with a single process here, unlike DDP in test_ddp.py.
"""

import pytest
import torch
from test_module import data_module, first_batch, perturbed_loss_and_grads
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                         checkpoint_wrapper)

from dpo_lightning import DPOModule
from dpo_lightning.training.distributed import DecoderLayers, decoder_layer_classes


@pytest.mark.parametrize("fixture, layer", [("tiny_llama", "LlamaDecoderLayer"), ("tiny_gpt2", "GPT2Block")])
def test_policy_wraps_every_decoder_layer_of_the_policy_and_the_reference(fixture, layer, request):
    model = DPOModule(request.getfixturevalue(fixture))
    assert {cls.__name__ for cls in decoder_layer_classes(model)} == {layer}
    wrapped = DecoderLayers()._run_policy(model, ignored_modules=set(), root_kwargs={})
    layers = [m for m in [*model.policy.modules(), *model.reference.modules()] if type(m).__name__ == layer]
    assert len(layers) == 4 and set(wrapped) == set(layers)  # 2 layers each, nothing else


def test_activation_checkpointing_by_the_policy_keeps_the_loss_and_gradients(tiny_llama):
    # What FSDPStrategy(activation_checkpointing_policy=DecoderLayers()) applies after wrapping, minus the sharding.
    batch = first_batch(data_module())
    loss, grads = perturbed_loss_and_grads(DPOModule(tiny_llama), batch)
    model = DPOModule(tiny_llama)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper, auto_wrap_policy=DecoderLayers())
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules()) == 4
    checkpointed_loss, checkpointed_grads = perturbed_loss_and_grads(model, batch)
    torch.testing.assert_close(checkpointed_loss, loss)
    for name, grad in checkpointed_grads.items():
        torch.testing.assert_close(grad, grads[name.replace("_checkpoint_wrapped_module.", "")], rtol=1e-5, atol=1e-6)


def test_a_model_without_no_split_modules_names_the_fix():
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))
