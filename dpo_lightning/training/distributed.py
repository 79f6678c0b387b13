"""Sharding a `DPOModule`: one FSDP unit per decoder layer, with FSDP (`DecoderLayers`) or FSDP2 (`fully_shard_models`).

Lightning's `FSDPStrategy` takes the classes to wrap as `auto_wrap_policy` and `activation_checkpointing_policy`,
but a config should not have to name `transformers.models.llama.modeling_llama.LlamaDecoderLayer` for each
model. Hugging Face models list their decoder layer class in `_no_split_modules` (the unit that
`accelerate`'s device maps never split), so `DecoderLayers` reads it from the model being wrapped:

    strategy:
      class_path: lightning.pytorch.strategies.FSDPStrategy
      init_args:
        auto_wrap_policy: {class_path: dpo_lightning.training.distributed.DecoderLayers}
        activation_checkpointing_policy: {class_path: dpo_lightning.training.distributed.DecoderLayers}  # optional

The frozen reference (`DPOModule.reference`) is wrapped by the same policy, so it is sharded like the
policy; its parameters keep `requires_grad=False`, and it runs under `torch.no_grad`, so it gets no
gradients. The embeddings, final norm and output head of both stay in the root unit, whose parameters mix
trainable and frozen ones: that needs `use_orig_params=True`, Lightning's default.

FSDP2 (`torch.distributed.fsdp.fully_shard`, Lightning's `ModelParallelStrategy`) leaves the wrapping to the
module: `DPOModule.configure_model` calls `fully_shard_models` with the strategy's device mesh
(configs/fsdp2.yaml).
"""

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import PreTrainedModel

from dpo_lightning.utils.hf import base_causal_lm, decoder as decoder_of


def decoder_layer_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes of `model`'s submodules that a Hugging Face model inside it names in `_no_split_modules`.

    Example: a `DPOModule` over Llama gives `{LlamaDecoderLayer}`; over GPT-2, `{GPT2Block}`.
    """
    names = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or ())
    classes = {type(module) for module in model.modules() if type(module).__name__ in names}
    if not classes:
        raise ValueError(f"no decoder layer class found in {type(model).__name__}: no Hugging Face model in it "
                         "lists one in `_no_split_modules`; give FSDPStrategy(auto_wrap_policy={YourLayerClass})")
    return classes


class DecoderLayers(ModuleWrapPolicy):
    """A `ModuleWrapPolicy` over the decoder layer classes of the model it is applied to (`decoder_layer_classes`).

    Use it as `FSDPStrategy(auto_wrap_policy=DecoderLayers())`, and as `activation_checkpointing_policy`
    to recompute each layer's activations in backward. An instance serves one model: it learns the classes
    from the first (root) module it is applied to.
    """

    def __init__(self):
        super().__init__(set())  # filled in from the model, which the policy sees only when it is applied

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module],
                    root_kwargs: dict[str, Any]) -> dict[nn.Module, dict[str, Any]]:
        self._learn(root_module)  # FSDP's wrapping calls this, with the root
        return super()._run_policy(root_module, ignored_modules, root_kwargs)

    def __call__(self, module: nn.Module, recurse: bool, *args, **kwargs) -> bool:
        # Activation checkpointing calls the policy module by module instead, the root first.
        if recurse and not self._module_classes:
            self._learn(module)
        return super().__call__(module, recurse, *args, **kwargs)

    def _learn(self, root_module: nn.Module) -> None:
        self._module_classes = decoder_layer_classes(root_module)
        self._module_classes_str = str(self._module_classes)


def fully_shard_models(module: nn.Module, mesh: DeviceMesh) -> None:
    """FSDP2 for a `DPOModule`'s policy and reference alike: each decoder layer its own unit, then the decoder
    (embeddings, final norm) and the output head, then the whole causal LM. Idempotent: Lightning calls
    `configure_model` again on a later fit, validate or test.

    The lean log-probs (logps.py) call the decoder and the head as two modules, never the causal LM's
    forward, so each is a unit of its own, gathered by its own call. The head runs once per chunk of
    response tokens and again in backward, so it keeps its weights gathered through the step
    (`reshard_after_forward=False`) rather than gathering them for every chunk.

    A head tied to the embedding shares its weight with the decoder's unit; FSDP2 then gathers it only for
    the module that owns it, so the head, called alone, would meet a shard (a DTensor). Tied models are
    sharded with the head in the root unit, which only the full-logits path (`lean_logps: false`) calls.

    An untied causal LM whose weights all lie in its decoder and head is no unit of its own: FSDP2 makes the
    first unit to run forward a root, and refuses a root's forward after one of its units ran alone. The lean
    path and the shared layout's check call the decoder alone (validation before the first step, by default),
    and sampling then calls the causal LM (online DPO, `GreedyReward`); with no causal-LM unit, the decoder and
    the head are each a root whichever runs first.
    """
    for model in (module.policy, module.reference):
        lm = base_causal_lm(model) if model is not None else None
        if lm is None or isinstance(lm, FSDPModule) or isinstance(decoder_of(lm), FSDPModule):
            continue
        decoder, head = decoder_of(lm), lm.get_output_embeddings()
        tied = head.weight is decoder.get_input_embeddings().weight
        if tied and module.uses_lean_logps:
            raise ValueError(f"FSDP2 (ModelParallelStrategy) with {type(lm).__name__}'s output head tied to its "
                             "embedding needs --model.lean_logps false (the lean path calls the head alone, "
                             "outside the unit that gathers the shared weight), or FSDPStrategy (configs/fsdp.yaml)")
        layers = decoder_layer_classes(lm)
        for layer in [m for m in lm.modules() if type(m) in layers]:
            fully_shard(layer, mesh=mesh)
        if not tied:
            fully_shard(decoder, mesh=mesh)
            fully_shard(head, mesh=mesh, reshard_after_forward=False)
        inner = {id(p) for part in (decoder, head) for p in part.parameters()}
        if tied or any(id(p) not in inner for p in lm.parameters()):
            fully_shard(lm, mesh=mesh)  # the head's tied weight, or weights outside both, in a root unit
