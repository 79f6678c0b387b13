"""Building the policy and its reference: loading, dropout, activation checkpointing, LoRA adapters (peft).

Where the reference comes from, by case (`build_models` picks; docs/how_it_works.md, "The reference", says why):
1. Full fine-tuning: a frozen in-memory copy of the policy, in the policy's dtype (TRL 1.16 reloads the
   reference from its hub name instead).
2. A new LoRA adapter (`add_lora`): the policy with the adapter disabled. No second copy; exact, because
   a new adapter starts at zero (LoRA's B = 0), so base = policy at step 0. torchtune's LoRA DPO recipe
   does the same.
3. A pretrained adapter (`load_adapter_policy`, e.g. an SFT adapter): disabling it would score against
   the bare base, not the model training starts from, and every reward would be off by the SFT shift
   from step 0 on, silently. Instead the adapter is copied, frozen, as a second adapter named
   `REFERENCE_ADAPTER` on the same base (as TRL's "ref" adapter), and `reference.reference_weights`
   switches to it.
`build_models` makes these parts; `reference.Reference` owns them from there on (and precomputed tables).
"""

import copy
import os
import re
from typing import Any, Mapping

import torch
from peft import (LoraConfig, PeftConfig, PeftModel, get_peft_config, get_peft_model, get_peft_model_state_dict,
                  set_peft_model_state_dict)
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from dpo_lightning.utils import quiet
from dpo_lightning.utils.hf import base_causal_lm, decoder, evaluating
from dpo_lightning.utils.locate import model_source

quiet.drop_weight_bars()  # transformers' "Loading weights" bar at every load (utils/quiet.py)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POLICY_ADAPTER = "default"  # peft's name for the adapter a model is wrapped with
REFERENCE_ADAPTER = "reference"


def load_causal_lm(name_or_path: str, torch_dtype: str | None, trust_remote_code: bool,
                   setting: str = "--model.model_name_or_path") -> PreTrainedModel:
    """A causal LM from a folder, the shipped assets or a hub id; a path not there fails naming `setting`."""
    dtype = DTYPES.get(torch_dtype, torch_dtype)  # "auto" and None pass through to transformers
    name_or_path = model_source(name_or_path, setting)
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)


def quantized_base(source: str | nn.Module, hp: Mapping[str, Any]) -> PreTrainedModel:
    """QLoRA's base for `DPOModule(load_in_4bit=True)` or its `quantization_config` (`BitsAndBytesConfig`'s
    arguments): 4-bit, by default NF4 with bf16 compute (Dettmers et al. 2023, arXiv:2305.14314). Checked
    first: a name or folder to load, and an adapter to train (4-bit weights cannot be)."""
    if not isinstance(source, str) or (hp.lora_r is None and hp.peft_config is None):
        raise ValueError("--model.load_in_4bit / --model.quantization_config quantize the base loaded from "
                         "--model.model_name_or_path (a name or folder) and train a LoRA adapter on it: set "
                         f"--model.lora_r (e.g. 16) or --model.peft_config; got {type(source).__name__}, "
                         f"lora_r {hp.lora_r}")
    try:
        import bitsandbytes  # noqa: F401  (transformers' own error names no install command)
    except ImportError as error:
        raise ImportError("--model.load_in_4bit / --model.quantization_config need bitsandbytes: "
                          "pip install -e .[qlora]") from error
    from transformers import BitsAndBytesConfig

    settings = hp.quantization_config or {"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "bfloat16"}
    dtype = DTYPES.get(hp.torch_dtype, hp.torch_dtype) or torch.bfloat16  # the layers left unquantized (norms, head)
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=hp.trust_remote_code,
                                                quantization_config=BitsAndBytesConfig(**{"load_in_4bit": True,
                                                                                          **settings}))


def merged_full_precision(policy: PeftModel, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """A QLoRA policy's adapter merged into a `dtype` copy of its base, reloaded from the base's source: merged
    into the 4-bit base itself, the sum would be rounded back to 4 bits and the adapter's update mostly lost."""
    base = AutoModelForCausalLM.from_pretrained(base_causal_lm(policy).name_or_path, dtype=dtype)
    merged = get_peft_model(base, copy.deepcopy(policy.peft_config[POLICY_ADAPTER]))
    set_peft_model_state_dict(merged, get_peft_model_state_dict(policy, adapter_name=POLICY_ADAPTER))
    return merged.merge_and_unload()


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(base_causal_lm(model), "is_loaded_in_4bit", False))


def is_adapter_folder(path: str) -> bool:
    """A local folder saved by peft (`adapter_config.json`), rather than a whole model."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def load_adapter_policy(path: str, torch_dtype: str | None, trust_remote_code: bool) -> PeftModel:
    """The base model named in the adapter's config, with the adapter loaded trainable."""
    base = load_causal_lm(PeftConfig.from_pretrained(path).base_model_name_or_path, torch_dtype, trust_remote_code,
                          f"the adapter's base model (base_model_name_or_path in {path}/adapter_config.json)")
    return PeftModel.from_pretrained(base, path, is_trainable=True)


def lora_config(r: int | None, alpha: float, dropout: float, target_modules: list[str] | str | None,
                peft_config: dict | None) -> PeftConfig | None:
    """The adapter config from `DPOModule`'s LoRA arguments or its full `peft_config` dict; None for neither."""
    if peft_config is not None:
        return get_peft_config({"peft_type": "LORA", "task_type": "CAUSAL_LM", **peft_config})
    if r is None:
        return None
    # target_modules None: peft's default for the architecture (q_proj, v_proj for Llama; c_attn for GPT-2).
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM")


def add_lora(model: PreTrainedModel, config: PeftConfig) -> PeftModel:
    """Wrap `model` with a new adapter; only the adapter's parameters stay trainable. `all-linear` means
    `linear_targets`, and so does no `target_modules` where peft knows no default for the architecture."""
    given = getattr(config, "target_modules", None)  # before peft fills in its defaults
    if isinstance(given, str) and given.lower() == "all-linear":
        given = config.target_modules = linear_targets(model)
    try:
        return get_peft_model(model, config)
    except ValueError:  # peft knows default targets for some architectures only (Phi-3, OLMo 2: none)
        if given is not None or not hasattr(config, "target_modules"):
            raise
    config.target_modules = linear_targets(model)  # peft checks its targets before it changes the model
    return get_peft_model(model, config)


# peft refuses LoRA on these modules of the Mamba family (`peft.tuners.tuners_utils._check_lora_target_modules_mamba`:
# the fused kernels read their weights directly).
MAMBA_FAMILY, NOT_ON_MAMBA = {"mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h"}, {"out_proj", "conv1d"}


def linear_targets(model: PreTrainedModel) -> str:
    """The linear layers LoRA can adapt, as a `target_modules` pattern: the `nn.Linear` and GPT-2 `Conv1D` modules
    (4-bit ones included) of the text decoder (not a vision or audio tower, not the head) that its forward calls,
    each returning a tensor. Unlike peft's own `all-linear`, not an MoE router built on nn.Linear whose forward
    returns a tuple (PhiMoE's, Llama-4's: peft's LoRA layer fails adding to it), not a layer whose weight the
    forward reads directly, where an adapter would never act (Mamba's `dt_proj`), both seen on a few tokens here,
    and not what peft refuses for the Mamba family. A name counts only if every module of the decoder so named
    is such a layer, since peft matches the pattern's names in all of them.

    Example:
        Llama -> "model\\.(.*\\.)?(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)"
    """
    text = decoder(model)
    text = text.get_decoder() if hasattr(text, "get_decoder") else text  # Gemma 4's language model
    prefix = next(name for name, module in model.named_modules() if module is text)
    linear = {name: isinstance(module, (nn.Linear, Conv1D)) for name, module in text.named_modules()}
    returns: dict[str, bool] = {}  # called module -> whether it returned a tensor
    hooks = [module.register_forward_hook(lambda _, args, out, name=name: returns.update({name: torch.is_tensor(out)}))
             for name, module in text.named_modules() if linear[name]]
    ids = torch.arange(3, 11, device=next(model.parameters()).device)[None] % model.config.get_text_config().vocab_size
    try:
        with evaluating(model), torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    usable: dict[str, bool] = {}
    for name, is_linear in linear.items():
        leaf = name.rsplit(".", 1)[-1]
        usable[leaf] = usable.get(leaf, True) and is_linear and returns.get(name, True)
    refused = NOT_ON_MAMBA if model.config.model_type in MAMBA_FAMILY else set()
    called = {name.rsplit(".", 1)[-1] for name in returns}
    names = sorted(called & {leaf for leaf, ok in usable.items() if ok} - refused)
    return rf"{re.escape(prefix)}\.(.*\.)?({'|'.join(names)})"


def add_reference_adapter(model: PeftModel) -> str:
    """Copy the policy's adapter, frozen, as a second adapter on the same base (case 3 above); returns its name."""
    model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(model.peft_config[POLICY_ADAPTER]))
    marker, reference_marker = f".{POLICY_ADAPTER}.", f".{REFERENCE_ADAPTER}."
    with torch.no_grad():
        for name, param in model.named_parameters():
            if marker in name:
                model.get_parameter(name.replace(marker, reference_marker)).copy_(param)
    model.set_adapter(POLICY_ADAPTER)  # the policy's adapter active and trainable, the copy frozen
    for name, param in model.named_parameters():
        if reference_marker in name:
            param.requires_grad_(False)
    return REFERENCE_ADAPTER


def zero_dropout(model: nn.Module) -> None:
    """Every dropout of `model` to 0: its dropout modules, and the rates its forward reads from an attribute or
    its config (OPT's `F.dropout(p=self.dropout)`, Falcon's `config.hidden_dropout`, MPT's `attn_pdrop`,
    OPT's `layerdrop`): any float attribute whose name holds "drop", on every module and (sub-)config.

    With dropout on, the policy and reference disagree at step 0 and the rewards start as noise.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        _zero_drop_rates(module)
    _zero_drop_rates(base_causal_lm(model).config)


def _zero_drop_rates(holder: Any) -> None:
    """Set `holder`'s float attributes named *drop* to 0, and those of the configs it holds."""
    for name, value in list(vars(holder).items()):
        if isinstance(value, float) and "drop" in name.lower():
            setattr(holder, name, 0.0)
        elif isinstance(value, PretrainedConfig):  # sub-configs: MPT's attn_config, a text_config
            _zero_drop_rates(value)


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in backward (non-reentrant, which needs no trainable input for LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_models(source: str | nn.Module, ref_source: str | nn.Module | None, needs_reference: bool,
                 hp: Mapping[str, Any]) -> tuple[nn.Module, nn.Module | None, str | None]:
    """The policy, the reference model (or None) and the reference adapter's name (or None), by the three
    cases above. `hp` holds `DPOModule`'s arguments. With `precompute_ref_log_probs` no reference model is
    built here: `Reference` loads one only if the cache misses. The reference model comes back as loaded, or
    as given (a model object, the tutorials' `ref_model`); `Reference` freezes it."""
    if ref_source is not None and ref_source is source:
        raise ValueError("--model.ref_model_name_or_path is the policy object itself, which training changes: pass "
                         "a separate copy (copy.deepcopy(model), or from_pretrained again), or leave it unset for a "
                         "frozen copy of the policy's starting weights")
    pretrained_adapter = isinstance(source, PeftModel) or (isinstance(source, str) and is_adapter_folder(source))
    validate_lora(hp, pretrained_adapter)
    adapter = lora_config(hp.lora_r, hp.lora_alpha, hp.lora_dropout, hp.lora_target_modules, hp.peft_config)
    policy = source
    if isinstance(source, str):
        policy = (load_adapter_policy if pretrained_adapter else load_causal_lm)(
            source, hp.torch_dtype, hp.trust_remote_code)
    # from_pretrained returns eval mode; activation checkpointing only runs in train mode.
    policy.train()
    if hp.disable_dropout:
        zero_dropout(policy)
    reference, reference_adapter = None, None
    later = hp.precompute_ref_log_probs
    if needs_reference and isinstance(ref_source, nn.Module):
        reference = ref_source  # as given, also with precomputation: nothing could load it again
    elif needs_reference and ref_source is not None and not later:
        reference = load_causal_lm(ref_source, hp.torch_dtype, hp.trust_remote_code, "--model.ref_model_name_or_path")
    elif needs_reference and pretrained_adapter and ref_source is None:
        reference_adapter = add_reference_adapter(policy)
    elif needs_reference and adapter is None and not later:
        reference = copy.deepcopy(policy)  # same weights and dtype, no reload
    if hp.gradient_checkpointing:
        enable_activation_checkpointing(base_causal_lm(policy))
    if adapter is not None:
        policy = add_lora(policy, adapter)  # the reference: this model with the adapter disabled
    return policy, reference, reference_adapter


def validate_lora(hp: Mapping[str, Any], pretrained_adapter: bool) -> None:
    """`DPOModule`'s LoRA and log-prob arguments, checked before any model is loaded."""
    if hp.lora_r is not None and (hp.peft_config is not None or hp.lora_r <= 0):
        raise ValueError(f"--model.lora_r must be > 0 and not combined with --model.peft_config; got lora_r "
                         f"{hp.lora_r}, peft_config {hp.peft_config}")
    if (hp.lora_r is not None or hp.peft_config is not None) and pretrained_adapter:
        raise ValueError("--model.model_name_or_path is a peft adapter, which brings its own config: remove "
                         "--model.lora_r / --model.peft_config")
    if hp.lora_dropout and hp.disable_dropout:
        raise ValueError(f"--model.lora_dropout {hp.lora_dropout} has no effect with --model.disable_dropout true "
                         "(every dropout is set to 0): set disable_dropout false, or lora_dropout 0")
    if hp.logps_chunk_size <= 0:
        raise ValueError(f"--model.logps_chunk_size must be > 0, got {hp.logps_chunk_size}")
