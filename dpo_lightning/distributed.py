"""Sharding a `DPOModule` with FSDP: one FSDP unit (and optionally one activation checkpoint) per decoder layer.

Lightning's `FSDPStrategy` takes the classes to wrap as `auto_wrap_policy` and `activation_checkpointing_policy`,
but a config should not have to name `transformers.models.llama.modeling_llama.LlamaDecoderLayer` for each
model. Hugging Face models list their decoder layer class in `_no_split_modules` (the unit that
`accelerate`'s device maps never split), so `DecoderLayers` reads it from the model being wrapped:

    strategy:
      class_path: lightning.pytorch.strategies.FSDPStrategy
      init_args:
        auto_wrap_policy: {class_path: dpo_lightning.distributed.DecoderLayers}
        activation_checkpointing_policy: {class_path: dpo_lightning.distributed.DecoderLayers}  # optional

The frozen reference (`DPOModule.reference`) is wrapped by the same policy, so it is sharded like the
policy; its parameters keep `requires_grad=False`, and it runs under `torch.no_grad`, so it gets no
gradients. The embeddings, final norm and output head of both stay in the root unit, whose parameters mix
trainable and frozen ones: that needs `use_orig_params=True`, Lightning's default.
"""

from typing import Any

from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers import PreTrainedModel


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
