"""The Hugging Face export: `ExportPretrained` at the end of fit, `export_pretrained` on a LoRA policy (merged
or adapter only), and `dpo-lightning export` from a checkpoint.

Users load the folder elsewhere, so each test reloads it with `from_pretrained` and checks it scores text
exactly as the trained module does, and that the model card states the run's real last validation.
Tiny models from conftest.py, saved to temp folders; no network.
"""

import csv
import hashlib
import json
import multiprocessing
import os
import re
import signal
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer, rows
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from dpo_lightning import DPOModule, ExportPretrained, PreferenceDataModule, ValidationSummary
from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.cli.main import cli_main, main
from dpo_lightning.callbacks.export import export_checkpoint, export_pretrained


def fit_from_the_cli(model_path: str, tmp_path, *flags: str):
    """A 4-step run through `dpo-lightning fit`, validating at steps 2 and 4; the CLI object."""
    train = tmp_path / "train.jsonl"
    Dataset.from_dict(rows(16)).to_json(train)
    return cli_main(["fit", f"--model.model_name_or_path={model_path}", "--model.learning_rate=1e-2",
                     f"--data.dataset={train}", f"--data.eval_dataset={train}", "--data.max_length=48",
                     "--data.max_prompt_length=24", "--data.batch_size=4", "--trainer.max_steps=4",
                     "--trainer.val_check_interval=2", "--trainer.check_val_every_n_epoch=null",
                     "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=dpo_lightning.ValidationSummary",
                     "--trainer.enable_progress_bar=false", *flags])


def pairs(tokenizer=None) -> PreferenceDataModule:
    return PreferenceDataModule(dataset=rows(16), eval_dataset=rows(4), tokenizer=tokenizer or ascii_tokenizer(),
                                max_length=48, max_prompt_length=24, batch_size=4)


def fit(model: DPOModule, data: PreferenceDataModule, callbacks=(), steps: int = 4) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, data)
    return trainer


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of the label tokens of each row (2B,): logits at t predict the token at t + 1."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    return (picked * mask).sum(-1)


def a_batch(data: PreferenceDataModule) -> dict[str, torch.Tensor]:
    """The validation pairs in the padded layout, one sequence a row, which `response_logps` reads."""
    data.setup("fit")
    return collate_pairs([data.val_data[i] for i in range(len(data.val_data))], data.tokenizer.pad_token_id)


def test_export_reloads_with_the_same_log_probs_and_a_card_with_the_final_metrics(tiny_gpt2, tmp_path):
    model, data = DPOModule(tiny_gpt2, learning_rate=1e-2), pairs()
    trainer = fit(model, data, [ValidationSummary(), ExportPretrained(str(tmp_path / "hf"))])
    folder = tmp_path / "hf"

    exported = AutoModelForCausalLM.from_pretrained(folder)
    batch = a_batch(data)
    torch.testing.assert_close(response_logps(exported, batch), response_logps(model.policy.eval(), batch))
    assert AutoTokenizer.from_pretrained(folder)("ab", add_special_tokens=False)["input_ids"] == [97, 98]
    assert json.loads((folder / "generation_config.json").read_text())["pad_token_id"] == 2  # pad = eos, no warning

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "dpo" in card.data.tags
    assert "base_model" not in card.data.to_dict()  # a local path: the hub would reject it as metadata
    final = trainer.callback_metrics
    for name in ("val/loss", "val/rewards/accuracies", "val/rewards/margins"):
        assert f"| {name} | {final[name].item():.4f} |" in card.text
    assert "## Validation metrics (after 4 optimizer steps; metrics.csv row step 3)" in card.text
    assert "| optimizer steps | 4 |" in card.text
    assert "| loss_type | `sigmoid` |" in card.text and "| beta | 0.1 |" in card.text
    assert f"| base model | `{tiny_gpt2}` |" in card.text


def test_lora_export_merged_or_adapter_only_scores_as_the_trained_policy(tiny_llama, tmp_path):
    tokenizer = ascii_tokenizer(add_bos=True)
    model, data = DPOModule(tiny_llama, learning_rate=1e-2), pairs(tokenizer)
    model.policy = get_peft_model(model.policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fit(model, data, steps=3)  # LoRA's B starts at 0: train so that the adapter matters
    batch = a_batch(data)
    trained = response_logps(model.policy.eval(), batch)
    assert not torch.allclose(trained, response_logps(AutoModelForCausalLM.from_pretrained(tiny_llama), batch))

    export_pretrained(model, tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(response_logps(merged, batch), trained)
    assert not any("lora" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    torch.testing.assert_close(response_logps(model.policy, batch), trained)  # merged a copy, not the policy

    export_pretrained(model, tokenizer, tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    adapter = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(response_logps(adapter, batch), trained)
    assert ModelCard.load(tmp_path / "adapter" / "README.md").data.library_name == "peft"
    # The adapter folder carries the pad id too: generation from it has one (pad = eos in training).
    assert json.loads((tmp_path / "adapter" / "generation_config.json").read_text())["pad_token_id"] == 2


def test_export_command_writes_the_checkpoints_policy_and_its_last_validation(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = tmp_path / "train.jsonl"
    cli = fit_from_the_cli(tiny_llama, tmp_path)
    checkpoint = next(tmp_path.rglob("checkpoints/*.ckpt"))
    main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "hf")])

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    batch = a_batch(cli.datamodule)
    torch.testing.assert_close(response_logps(exported, batch), response_logps(cli.model.policy.eval(), batch))
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("ab")["input_ids"] == [1, 97, 98]  # the model's, BOS too
    card = (tmp_path / "hf" / "README.md").read_text()
    last = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationSummary)).history[-1]
    assert last["step"] == 4 and "## Validation metrics (after 4 optimizer steps; metrics.csv row step 3)" in card
    assert f"| val/rewards/accuracies | {last['val/rewards/accuracies']:.4f} |" in card
    with open(next(tmp_path.rglob("metrics.csv"))) as f:  # the row the card names holds the same values
        row = next(r for r in csv.DictReader(f) if r["step"] == "3" and r["val/rewards/accuracies"])
    assert f"| val/rewards/accuracies | {float(row['val/rewards/accuracies']):.4f} |" in card
    assert f"`{train}`" in card  # the data, from the config.yaml LightningCLI saved beside the checkpoint


def test_export_of_a_run_from_an_adapter_folder_takes_the_base_models_tokenizer(tiny_llama, tmp_path, monkeypatch):
    # An SFT adapter saved by peft holds no tokenizer files; training took the tokenizer from the base it names.
    adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(tmp_path / "sft_adapter")
    assert not any(p.name.startswith("tokenizer") for p in (tmp_path / "sft_adapter").iterdir())
    monkeypatch.chdir(tmp_path)
    cli = fit_from_the_cli(str(tmp_path / "sft_adapter"), tmp_path)
    checkpoint = next(tmp_path.rglob("checkpoints/*.ckpt"))
    export_checkpoint(checkpoint, tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("ab")["input_ids"] == [1, 97, 98]  # the base's, BOS too
    batch = a_batch(cli.datamodule)
    torch.testing.assert_close(response_logps(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), batch),
                               response_logps(cli.model.policy.eval(), batch))


def test_adapter_only_export_of_a_full_fine_tune_is_refused(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fit_from_the_cli(tiny_llama, tmp_path)
    checkpoint = next(tmp_path.rglob("checkpoints/*.ckpt"))
    # Our own check: one line at the command line, no traceback.
    with pytest.raises(SystemExit, match="^dpo-lightning: --adapter_only: .*full fine-tune, not a LoRA adapter; "
                                         "export it without --adapter_only$"):
        main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "hf"), "--adapter_only"])
    assert not (tmp_path / "hf").exists()


def test_export_and_load_from_checkpoint_warn_of_no_resume_and_a_resumed_fit_names_only_settings(tiny_llama, tmp_path,
                                                                                                  monkeypatch):
    # Nothing resumes in an export or a load: they warned "resuming from a checkpoint trained with other settings:
    # _instantiator ...", naming LightningCLI's bookkeeping key.
    monkeypatch.chdir(tmp_path)
    fit_from_the_cli(tiny_llama, tmp_path)
    checkpoint = next(tmp_path.rglob("checkpoints/*.ckpt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["export", "--ckpt_path", str(checkpoint), "--output_dir", str(tmp_path / "hf")])
        DPOModule.load_from_checkpoint(checkpoint)
        DPOModule.load_from_checkpoint(checkpoint, beta=0.3)  # other settings, still no run to resume
    assert [str(w.message) for w in caught if "resuming" in str(w.message)] == []

    with warnings.catch_warnings(record=True) as caught:  # a fit that resumes with another beta says so
        warnings.simplefilter("always")
        cli = fit_from_the_cli(tiny_llama, tmp_path, "--model.beta=0.2", "--trainer.max_steps=5",
                               f"--ckpt_path={checkpoint}")
    # The command line's beta trains (LightningCLI put the checkpoint's hyperparameters over it, silently).
    assert cli.model.hparams.beta == 0.2 and cli.model.objective.beta == 0.2 and cli.trainer.global_step == 5
    (message,) = [str(w.message) for w in caught if "resuming" in str(w.message)]
    assert re.search(r"other settings: (.*?)\. The run's", message).group(1) == "beta 0.1 -> 0.2"


def _export_and_hang_after_the_weights(module: DPOModule, out: str, marker: str) -> None:
    """Export `module`, stopping for good once the weights are written (the tokenizer's save is next)."""
    def hang(self, *args, **kwargs):
        Path(marker).touch()
        time.sleep(600)

    PreTrainedTokenizerBase.save_pretrained = hang
    export_pretrained(module, ascii_tokenizer(), out)


def contents(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-an-earlier-export"])
def test_an_export_killed_after_its_weights_leaves_the_earlier_folder_whole_or_none(tiny_gpt2, tmp_path, earlier):
    # Before: the folder held the new weights and config at once, which from_pretrained loads as a whole model;
    # over an earlier export, the new weights beside the earlier tokenizer and model card.
    out, marker = tmp_path / "hf", tmp_path / "weights-written"
    module = DPOModule(tiny_gpt2)
    if earlier:
        export_pretrained(module, ascii_tokenizer(), out)
    before = contents(out) if earlier else None
    with torch.no_grad():
        next(module.policy.parameters()).add_(1.0)  # other weights, so that a mix would show
    writer = multiprocessing.get_context("fork").Process(target=_export_and_hang_after_the_weights,
                                                         args=(module, str(out), str(marker)))
    writer.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert writer.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(timeout=60)
    assert writer.exitcode == -signal.SIGKILL
    if earlier:
        assert contents(out) == before  # the earlier export, byte for byte
    else:
        assert not out.exists()
    export_pretrained(module, ascii_tokenizer(), out)  # the next export replaces it whole
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(next(reloaded.parameters()), next(module.policy.parameters()))
