"""Which models may take the shared layout (`dpo_lightning/data/layouts.py`), checked where training will run it.

- The check runs on a batch shaped as training's (its rows, lengths and packing), not only on its own one-row
  probe: a model whose attention fails only on two-row batches (as flex_attention's CPU code generation does in
  torch 2.13) is kept padded, with the reason printed; a batch from another collator, or a stream's first batch,
  is checked as it comes.
- Llama-4's chunked attention and Gemma 4's sliding window (read from its text config) are in the shared mask:
  log-probs equal each sequence's own forward on prompts longer than a chunk or a window, lean and full logits.
- Recurrent and convolutional layers (LFM2, Qwen3.5, Mamba) are refused by name, not by a numeric check a random
  model can pass.

Tiny models built from configs (conftest.py, test_architectures.py): no network.
"""

import os

import lightning as L
import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.data import layouts
from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.data.layouts import Shared, choose_layout, shared_layout_unsupported
from dpo_lightning.data.packing import collate_shared
from dpo_lightning.training.logps import lean_logps, lean_unsupported, naive_logps

from conftest import data_module
from conftest import rows as text_rows
from test_architectures import tiny_model


def fails_on_several_rows(path: str) -> torch.nn.Module:
    """A Llama whose attention fails on a 4D-masked batch of more than one row (flex_attention's CPU kernels in
    torch 2.13 fail to compile there), and runs the one-row batch of the shared layout's own probe."""
    llama = AutoModelForCausalLM.from_pretrained(path)

    def fail(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4 and mask.shape[0] > 1:
            raise RuntimeError("the attention kernel failed to compile for 2 rows")

    llama.model.register_forward_pre_hook(fail, with_kwargs=True)
    return llama


def test_auto_checks_the_shared_layout_on_a_batch_shaped_as_training(tiny_llama, tmp_path, caplog):
    # 4 pairs of 20-30 tokens, packed under max_length 64: two rows per batch, where the probe's pairs fit in one.
    data = PreferenceDataModule(text_rows(8), tokenizer=tiny_llama, batch_size=4, max_length=64, max_prompt_length=32)
    seen = []

    class Layouts(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch["layout"])

    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Layouts()])
    with caplog.at_level("INFO"):
        trainer.fit(DPOModule(fails_on_several_rows(tiny_llama)), data)
    assert seen == ["padded", "padded"]
    [line] = [r.getMessage() for r in caplog.records if "batch layout" in r.getMessage()]
    assert "padded (--data.prefix_sharing auto: LlamaForCausalLM cannot take the shared layout's 4D" in line
    assert "a batch of 2 rows" in line and "failed to compile for 2 rows" in line


def test_a_shared_batch_from_another_collator_is_checked_as_it_comes(tiny_llama, tmp_path):
    data = PreferenceDataModule(text_rows(4), tokenizer=tiny_llama, max_length=64, max_prompt_length=32)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(list(data.train_data), batch_size=4,
                                         collate_fn=lambda rows: collate_shared(rows, 0, packing=True,
                                                                                max_tokens_per_row=64))
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="--data.prefix_sharing: .* on a batch of 2 rows .* Set --data.prefix_sharing"):
        trainer.fit(DPOModule(fails_on_several_rows(tiny_llama)), loader)


def test_a_streamed_datasets_first_batch_is_checked_as_it_comes(tiny_llama, tmp_path):
    # A stream has no rows to check at setup: its first batch is checked before its forward, and refused by name.
    train = tmp_path / "train.jsonl"
    Dataset.from_dict(text_rows(8)).to_json(train)
    data = PreferenceDataModule(str(train), tokenizer=tiny_llama, batch_size=4, max_length=64, max_prompt_length=32,
                                streaming=True)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="--data.prefix_sharing: .* on a batch of 2 rows .* Set --data.prefix_sharing"):
        trainer.fit(DPOModule(fails_on_several_rows(tiny_llama)), data)


@pytest.mark.skipif(not torch.__version__.startswith("2.13") or torch.cuda.is_available()
                    or "ATEN_CPU_CAPABILITY" in os.environ,  # inductor then compiles for another kernel set
                    reason="reproduces torch 2.13's CPU code generation failure for flex_attention")
def test_flex_attention_on_cpu_is_kept_padded_naming_the_failure(tiny_llama):
    # The reproduction: the probe's one-row batch runs, training's two-row batch fails in torch's compiler.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="flex_attention")
    data = data_module(8, eval_n=0, tokenizer=tiny_llama, max_length=64, max_prompt_length=32)
    data.setup("fit")
    sample = [data.train_data[i] for i in range(4)]
    assert Shared(True, 64).collate(sample, 0)["input_ids"].shape[0] == 2
    module = DPOModule(model, lean_logps=False)
    try:
        layout, reason = choose_layout("auto", "auto", 64, module.layout_unsupported, sample)
    finally:  # flex_attention's compiled kernels would otherwise be recompiled for dynamic shapes in later tests
        torch.compiler.reset()
    assert layout.name == "padded" and "a batch of 2 rows" in reason, reason


@pytest.mark.parametrize("bf16", ["weights", "autocast"])
def test_bf16_rounding_on_training_batches_keeps_the_shared_layout(tiny_llama, bf16):
    # The check compares two layouts' bf16 matmuls of other shapes: their rounding is no reason to fall back.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16 if bf16 == "weights" else None)
    data = data_module(8, eval_n=0, tokenizer=tiny_llama, max_length=64, max_prompt_length=32)
    data.setup("fit")
    module = DPOModule(model)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16 == "autocast"):
        layout, reason = choose_layout("auto", "auto", 64, module.layout_unsupported,
                                       [data.train_data[i] for i in range(4)])
    assert layout.name == "shared", reason


def alone_logps(model: torch.nn.Module, pairs: list[dict]) -> torch.Tensor:
    """Summed log-probs (2B,), chosen then rejected: each prompt + response run alone through the model's own
    forward (no padding, the model's own mask), log-softmaxed at t and scored at the token t + 1."""
    scores = []
    with torch.no_grad():
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for row in pairs:
                prompt, response = row["prompt_input_ids"], row[side]
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
                scores.append(logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum())
    return torch.stack(scores)


def long_pairs() -> list[dict]:
    """Prompts of 20 and 13 tokens, past test_architectures' chunk and window of 8 (so are the responses)."""
    generator = torch.Generator().manual_seed(3)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 128, (n,), generator=generator).tolist()

    return [{"prompt_input_ids": tokens(20), "chosen_input_ids": tokens(9), "rejected_input_ids": tokens(12)},
            {"prompt_input_ids": tokens(13), "chosen_input_ids": tokens(11), "rejected_input_ids": tokens(4)}]


@pytest.mark.parametrize("compute", [naive_logps, lean_logps], ids=["full", "lean"])
@pytest.mark.parametrize("name", ["llama4_text", "gemma4"])
def test_chunked_and_windowed_layers_give_each_sequence_its_own_forward(name, compute):
    # Llama-4's chunked layers were missing from the mask (off by several nats past one chunk) and its lean head
    # not found (its `base_model` is the whole causal LM); Gemma 4's window sits in its text config, which the
    # mask did not read. Padded, one pair per row and packed must all equal each sequence's own forward.
    model = tiny_model(name).eval()
    assert lean_unsupported(model) is None and shared_layout_unsupported(model) is None
    pairs = long_pairs()
    expected = alone_logps(model, pairs)
    with torch.no_grad():
        for batch in (collate_pairs(pairs, 0), collate_shared(pairs, 0),
                      collate_shared(pairs, 0, packing=True, max_tokens_per_row=100)):
            torch.testing.assert_close(compute(model, batch)[0], expected, rtol=1e-5, atol=1e-4)


def test_probe_reaches_past_the_attention_chunk(monkeypatch):
    # A mask without the chunk must be refused: the probe's first prompt is as long as the chunk.
    model = tiny_model("llama4_text")
    spanned = layouts.visible
    monkeypatch.setattr(layouts, "visible", lambda batch, b, q, k, span=None: spanned(batch, b, q, k))
    assert "ignores the shared layout's attention mask" in shared_layout_unsupported(model)


MAMBA = {"mamba2": dict(model_type="mamba2", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_heads=4,
                        head_dim=16, state_size=8, n_groups=1, expand=2, conv_kernel=3),
         "granitemoehybrid": dict(model_type="granitemoehybrid", vocab_size=128, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                                  mamba_n_groups=1, layer_types=["mamba", "attention"])}


@pytest.mark.parametrize("name, kinds", [("lfm2", "conv"), ("qwen3_5", "linear_attention"), ("mamba", "mamba"),
                                         ("mamba2", "mamba"), ("granitemoehybrid", "mamba")])
def test_recurrent_layers_are_refused_by_name(name, kinds):
    # LFM2's short convolutions passed the numeric probe in a random model (5e-5 nats), yet moved its gradients.
    # transformers lists the Mamba family's state-space layers as linear_attention: they are named by their kind.
    if name in MAMBA:
        settings = dict(MAMBA[name])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))
    else:
        model = tiny_model(name)
    assert shared_layout_unsupported(model) == (
        f"{type(model).__name__} has {kinds} layers, which take no mask the shared layout builds (a recurrent "
        "state or convolution runs along the row, from one response into the next)")


def test_a_model_with_non_finite_logits_is_refused_the_lean_path_by_reason(tiny_llama):
    # A NaN logit made torch.allclose raise ("atol must be greater than or equal to zero") out of our check.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    assert "own logits on 8 tokens are not finite" in lean_unsupported(model)
    assert "ignores the shared layout's attention mask" in shared_layout_unsupported(model)
    with pytest.warns(UserWarning, match="--model.lean_logps: .* not finite .* using the full-logits path"):
        assert not DPOModule(model).uses_lean_logps
