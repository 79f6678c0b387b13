"""Export a trained policy as a Hugging Face folder, with a model card, from a module or a checkpoint.

The folder is what `save_pretrained` writes (config, safetensors weights, generation config) plus the
tokenizer and a `README.md` model card: the base model, the data, the loss, beta, the steps trained and
the last validation's metrics. `AutoModelForCausalLM.from_pretrained(folder)` loads it and
`huggingface_hub.upload_folder` (or `push_to_hub`) accepts it as it is. A LoRA policy (a
`peft.PeftModel`) is merged into its base weights by default, or saved as the adapter alone.

    dpo-lightning export --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt --output_dir hf_model

`ExportPretrained`, below, does the same at the end of fit.
"""

import copy
import csv
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_warn
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import GenerationConfig, PreTrainedTokenizerBase

from dpo_lightning.callbacks.loggers import log_file
from dpo_lightning.callbacks.validation import last_validation
from dpo_lightning.training.models import is_quantized, merged_full_precision
from dpo_lightning.training.module import DPOModule
from dpo_lightning.utils.atomic import atomic_path
from dpo_lightning.utils.hf import base_causal_lm
from dpo_lightning.utils.locate import existing, is_hub_id
from dpo_lightning.utils.tokenizers import load_tokenizer, tokenizer_source

CARD_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected")


def export_pretrained(module: L.LightningModule, tokenizer: PreTrainedTokenizerBase | None, output_dir: str | os.PathLike,
                      merge_lora: bool = True, metrics: dict[str, float] | None = None, *, steps: int | None = None,
                      validation_step: int | None = None, data: dict[str, Any] | None = None,
                      is_main_process: bool = True) -> Path:
    """Write `module.policy` as a Hugging Face folder with its tokenizer and a model card.

    Args:
        module: the trained module; its policy may be a `peft.PeftModel`.
        tokenizer: saved next to the weights (None: not saved, the card says so).
        output_dir: the folder to write (created; an earlier one there is replaced whole, once the new one is).
        merge_lora: for a LoRA policy, merge the adapter into a copy of the base weights (a plain
            model, no peft needed to load it); False saves the adapter alone (adapter_model.safetensors).
        metrics: the last validation's metrics, `val/...` -> value, for the card.
        steps: optimizer steps trained, for the card.
        validation_step: the step of the validation that gave `metrics`, for the card.
        data: the data module's arguments (`dataset`, `split`, `eval_dataset`, ...), for the card.
        is_main_process: whether this process writes; every rank must call (gathering sharded
            weights is collective), as with `save_pretrained`.

    Returns:
        The folder.
    """
    out = Path(output_dir)
    model, adapter_only = unwrap_policy(module.policy, merge_lora)
    # Adapter only: the policy's adapter, not a frozen reference adapter the policy may also carry.
    kwargs = {"selected_adapters": [model.active_adapter]} if adapter_only else {}
    if any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP2's shards: every rank gathers each weight
        kwargs["state_dict"] = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    if not is_main_process:  # it takes part in gathering the weights; rank 0 writes them
        with tempfile.TemporaryDirectory() as scratch:  # `save_pretrained` creates its folder on every rank
            model.save_pretrained(scratch, is_main_process=False, **kwargs)
        return out
    with atomic_path(out) as partial:  # a killed export leaves the previous folder whole, or none
        model.save_pretrained(partial, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        # Adapter folders too: peft's loader reads it, and without a pad id `generate` has none.
        generation_config(base_causal_lm(model), tokenizer).save_pretrained(partial)
        card = model_card(module, adapter_only=adapter_only, with_tokenizer=tokenizer is not None,
                          metrics=metrics or {}, steps=steps, validation_step=validation_step, data=data or {})
        (Path(partial) / "README.md").write_text(card)
    return out


def unwrap_policy(policy: nn.Module, merge_lora: bool) -> tuple[nn.Module, bool]:
    """The model to save, and whether it is an adapter alone.

    A merge works on a copy (the policy may go on training) and merges the active adapter only; peft's
    `merge_and_unload` then drops every adapter layer, a frozen reference adapter included.
    """
    if not isinstance(policy, PeftModel):
        if not merge_lora:
            rank_zero_warn("merge_lora=False: the policy has no LoRA adapter (a full fine-tune), so the whole model "
                           "is saved")
        return policy, False
    if not merge_lora:
        return policy, True
    if is_quantized(policy):  # QLoRA: merge into a bf16 copy of the base, not into its 4-bit weights
        return merged_full_precision(policy), False
    return copy.deepcopy(policy).merge_and_unload(), False


def base_model(policy: nn.Module) -> str | None:
    if isinstance(policy, PeftModel):
        return policy.peft_config[policy.active_adapter].base_model_name_or_path
    return getattr(policy, "name_or_path", None) or None


def generation_config(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> GenerationConfig:
    """The model's generation config with pad and eos ids filled in from the tokenizer where unset.

    Without a pad id, `generate` warns on every call; training used pad = eos (`data.load_tokenizer`).
    """
    config = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    config = copy.deepcopy(config)
    if tokenizer is not None:
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
        if config.eos_token_id is None:
            config.eos_token_id = tokenizer.eos_token_id
    return config


def model_card(module: L.LightningModule, adapter_only: bool, with_tokenizer: bool, metrics: dict[str, float],
               steps: int | None, validation_step: int | None, data: dict[str, Any]) -> str:
    """The README.md of the exported folder: hub metadata, then the run in tables."""
    hp, base = dict(module.hparams), base_model(module.policy)
    meta: dict[str, Any] = {"library_name": "peft" if adapter_only else "transformers",
                            "pipeline_tag": "text-generation", "tags": ["dpo", "dpo-lightning", "lightning"]}
    if base and is_hub_id(base):
        meta["base_model"] = base
    if isinstance(data.get("dataset"), str) and is_hub_id(data["dataset"]):
        meta["datasets"] = [data["dataset"]]
    loss, beta, steps_text = hp.get("loss_type", "sigmoid"), hp.get("beta"), "?" if steps is None else steps
    weights = ("LoRA adapter only (load it with peft)" if adapter_only else
               "LoRA merged into the base weights" if isinstance(module.policy, PeftModel) else "full")
    rows = [("base model", f"`{base}`" if base else "(built in memory)"), ("weights", weights),
            ("data", describe_data(data) if data else "(not recorded)"), ("loss_type", f"`{loss}`"),
            ("beta", beta), ("optimizer steps", steps_text)]
    # Keys starting with "_" are bookkeeping, not settings: LightningCLI's `_instantiator`, for one.
    settings = {k: v if isinstance(v, (str, int, float, bool, list, dict)) else repr(v)
                for k, v in hp.items() if v is not None and not k.startswith("_")}
    loader = "peft.AutoPeftModelForCausalLM" if adapter_only else "transformers.AutoModelForCausalLM"
    return "\n".join([
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# DPO fine-tune of {base or 'a causal LM'}", "",
        f"Trained with dpo_lightning (DPO: Rafailov et al. 2023, arXiv:2305.18290): loss_type `{loss}`, "
        f"beta {beta}, {steps_text} optimizer steps.", "",
        "## Training", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "",
        *validation_table(metrics, validation_step),
        "## All hyperparameters", "", "```yaml", yaml.safe_dump(settings, sort_keys=False).strip(), "```", "",
        *([] if with_tokenizer else ["No tokenizer was saved in this folder: use the base model's.", ""]),
        "## Use", "", f"`{loader}.from_pretrained(path_to_this_folder)`.", ""])


def validation_table(metrics: dict[str, float], step: int | None) -> list[str]:
    if not metrics:
        return ["No validation metrics were recorded for this run.", ""]
    shown = [f"val/{m}" for m in CARD_METRICS if f"val/{m}" in metrics]
    shown += sorted(k for k in metrics if k not in shown)
    # Lightning's loggers put a validation after N optimizer steps on the row of step N - 1 (0 stays 0).
    title = (f"## Validation metrics (after {step} optimizer steps; metrics.csv row step {max(step - 1, 0)})"
             if step is not None else "## Validation metrics (last validation)")
    return [title, "", "| metric | value |", "|---|---|", *[f"| {k} | {metrics[k]:.4f} |" for k in shown], ""]


def describe_data(data: dict[str, Any]) -> str:
    """One line for the card: where the training and validation rows came from, and the length limits."""
    dataset, eval_dataset = data.get("dataset"), data.get("eval_dataset")
    parts = [f"`{dataset}`" if isinstance(dataset, str) else f"in-memory rows ({type(dataset).__name__})"]
    parts += [f"{key} {data[key]}" for key in ("dataset_config", "data_dir", "split") if data.get(key)]
    if eval_dataset is not None:
        parts.append(f"validation `{eval_dataset}`" if isinstance(eval_dataset, str) else "in-memory validation rows")
    elif data.get("eval_split"):
        parts.append(f"validation split {data['eval_split']}")
    parts += [f"{key} {data[key]}" for key in ("max_length", "max_prompt_length") if data.get(key)]
    return ", ".join(parts)


def export_checkpoint(ckpt_path: str | os.PathLike, output_dir: str | os.PathLike, merge_lora: bool = True,
                      tokenizer: str | None = None) -> Path:
    """Export a Lightning checkpoint of a `DPOModule` (what `dpo-lightning export` runs).

    The tokenizer is `tokenizer`, else the run's `--data.tokenizer`, else the model's. Steps come from the
    checkpoint; the validation metrics from `ValidationSummary`'s state in the checkpoint, else from the
    `metrics.csv` of the CSV logger beside it; the data from the `config.yaml` LightningCLI saved there.
    """
    ckpt_path = Path(existing(ckpt_path, "--ckpt_path", "checkpoint"))
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    module = DPOModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    run_dir = ckpt_path.parent.parent  # <log_dir>/checkpoints/x.ckpt
    config = run_config(run_dir)
    data_hparams = {**checkpoint.get("datamodule_hyper_parameters", {}), **config.get("data", {})}
    if not merge_lora and not isinstance(module.policy, PeftModel):
        raise ValueError(f"--adapter_only: {ckpt_path} holds a full fine-tune, not a LoRA adapter; export it "
                         "without --adapter_only")
    # As training did: the named tokenizer, else the base model's (none for a model built in memory).
    named = tokenizer or data_hparams.get("tokenizer")
    found = named or module.model_name_or_path
    step, metrics = checkpoint_validation(checkpoint, run_dir)
    loaded = load_tokenizer(tokenizer_source(named, module.model_name_or_path)) if found else None
    return export_pretrained(module, loaded, output_dir, merge_lora, metrics,
                             steps=checkpoint.get("global_step"), validation_step=step,
                             data=data_hparams if "dataset" in data_hparams else None)


def run_config(run_dir: Path) -> dict:
    """The `config.yaml` LightningCLI saves in the log dir; {} for a run started from Python."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def checkpoint_validation(checkpoint: dict, run_dir: Path) -> tuple[int | None, dict[str, float]]:
    """(step, metrics) of the last validation before the checkpoint was saved, or (None, {})."""
    for state in checkpoint.get("callbacks", {}).values():
        history = state.get("history") if isinstance(state, dict) else None
        if history:
            return history[-1]["step"], {k: float(v) for k, v in history[-1].items() if k != "step"}
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None, {}
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/loss")
                and int(row["step"]) <= checkpoint.get("global_step", 0)]
    if not rows:
        return None, {}
    last = rows[-1]
    steps = int(last["step"]) + 1 if int(last["step"]) else 0  # the row of step N - 1 is after N steps
    return steps, {k: float(v) for k, v in last.items() if k.startswith("val/") and v}


class ExportPretrained(L.Callback):
    """At the end of fit, save the policy, tokenizer and a model card as a Hugging Face folder.

    The folder (safetensors, generation config, README.md model card with the base model, data, loss,
    beta, steps and last validation metrics) loads with `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained`; see `export_pretrained`. The card also goes to the run's loggers
    (`log_file`: W&B and MLflow keep it as `hf_model/README.md`, TensorBoard as text).

    Args:
        dirpath: where to write. Default: `<trainer.log_dir>/hf_model`.
        merge_lora: for a LoRA policy, merge the adapter into the base weights; False saves the adapter alone.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True):
        self.dirpath, self.merge_lora = dirpath, merge_lora
        self.exported: str | None = None  # the folder written at the end of fit (`ValidationSummary` lists it)

    def output_folder(self, trainer: L.Trainer) -> tuple[str, str]:
        """Where it writes, and the setting that chose it (checked at setup: `training.preflight`)."""
        path = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")
        return path, "ExportPretrained's dirpath (or the logger's folder)"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.output_folder(trainer)[0]
        datamodule = trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None)
        data = None
        if datamodule is not None and hasattr(datamodule, "dataset"):
            data = {**datamodule.hparams, "dataset": datamodule.dataset, "eval_dataset": datamodule.eval_dataset}
        step, metrics = last_validation(trainer)
        # Every rank calls: under FSDP gathering the weights is collective; only rank 0 writes.
        export_pretrained(pl_module, tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None, path,
                          self.merge_lora, metrics, steps=trainer.global_step, validation_step=step, data=data,
                          is_main_process=trainer.is_global_zero)
        self.exported = path
        if trainer.is_global_zero:
            log_file(trainer.loggers, Path(path) / "README.md", trainer.global_step)
            print(f"[dpo_lightning] saved the policy, tokenizer and model card to {path}")

