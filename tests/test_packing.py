"""The shared-prefix and packed layouts (`dpo_lightning/packing.py`) against the padded layout they replace.

The layout is checked on literal tensors worked out by hand; the packer for its budget; and on a tiny
Llama and a tiny GPT-2 (sdpa and eager attention) the log-probs, mean logits, token counts, a DPO loss
and every parameter's gradient must equal the padded batch's (1e-5), through both `naive_logps` and
`lean_logps`, one pair per row and packed, on pairs of very different lengths with a one-token prompt and
one-token responses. FlexAttention runs forward only on CPU (torch 2.13 has no CPU backward for it), so
only its no-grad log-probs are checked. A model that ignores the mask must be caught by
`shared_layout_unsupported`. Tiny models from configs saved to temp folders (conftest.py): no network.
"""

import os
import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.data import layouts
from dpo_lightning.data.batches import collate_pairs
from dpo_lightning.training.logps import lean_logps, naive_logps
from dpo_lightning.training.losses import sigmoid_loss
from dpo_lightning.data.layouts import attention_mask, shared_layout_unsupported
from dpo_lightning.data.packing import collate_shared, pack_pairs, shared_pairs

from conftest import BF16_RTOL
from conftest import rows as text_rows


def pair(prompt: list[int], chosen: list[int], rejected: list[int], **extra) -> dict:
    return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected, **extra}


# Lengths 13 to 4 tokens: a one-token prompt, one-token responses, a long prompt with a short response
# and the reverse, so one pair per row pads a lot and packing puts several pairs in a row.
PAIRS = [pair([5, 6, 9, 10, 11, 12, 13, 14], [7, 2], [8, 9]),
         pair([3], [20, 21, 22, 23, 24, 25, 26], [30]),
         pair([13, 14, 15], [50], [60, 61, 62, 63]),
         pair([40, 41], [42], [43]),
         pair([70, 71, 72, 73], [74, 75, 76], [77, 78, 79, 80, 81, 82])]


def test_one_pair_per_row_layout_by_hand():
    # Row [p p | c c | r r r]: position ids restart at 2 for the rejected response. Both responses are
    # scored from the last prompt position (1); the chosen one then from 2, 3 and the rejected from 4, 5, 6.
    batch = collate_shared([pair([5, 6], [7, 2], [8, 9, 2], row_id=4)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 8, 9, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert batch["pair_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 0]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    assert batch["response_positions"].tolist() == [[1, 2, 3, 0], [1, 4, 5, 6]]
    assert batch["labels"].tolist() == [[-100, 7, 2, -100], [-100, 8, 9, 2]]
    assert batch["pairs_per_row"].tolist() == [1] and batch["row_ids"].tolist() == [4]
    # Query rows, key columns: chosen sees the prompt and itself, rejected the prompt and itself.
    expected = [[1, 0, 0, 0, 0, 0, 0],   # p0
                [1, 1, 0, 0, 0, 0, 0],   # p1
                [1, 1, 1, 0, 0, 0, 0],   # c0
                [1, 1, 1, 1, 0, 0, 0],   # c1
                [1, 1, 0, 0, 1, 0, 0],   # r0: not c0, c1
                [1, 1, 0, 0, 1, 1, 0],   # r1
                [1, 1, 0, 0, 1, 1, 1]]   # r2
    assert attention_mask(stand_in(), batch)[0, 0].int().tolist() == expected


def test_packed_layout_by_hand():
    # Pair 0 = [5 | 7 | 8 9] (4 tokens), pair 1 = [3 4 | 6 2 | 2] (5 tokens), budget 9: the longer pair
    # goes first, so the row is [3 4 6 2 2 | 5 7 8 9]. Position ids restart per pair; pair ids say whose
    # token it is. Chosen 0 is scored from 5 (its prompt's last token) and 6; chosen 1 from 1, 2, 3;
    # rejected 0 from 5, 7, 8; rejected 1 from 1, 4. Padding columns point at 0 with label -100.
    batch = collate_shared([pair([5], [7], [8, 9]), pair([3, 4], [6, 2], [2])], 0, packing=True, max_tokens_per_row=9)
    assert batch["input_ids"].tolist() == [[3, 4, 6, 2, 2, 5, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert batch["pair_ids"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0, 0]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 2, 0, 1, 2, 2]]
    assert batch["response_positions"].tolist() == [[5, 6, 0], [1, 2, 3], [5, 7, 8], [1, 4, 0]]
    assert batch["labels"].tolist() == [[-100, 7, -100], [-100, 6, 2], [-100, 8, 9], [-100, 2, -100]]
    assert batch["pairs_per_row"].tolist() == [2]
    expected = [[1, 0, 0, 0, 0, 0, 0, 0, 0],   # pair 1: p0
                [1, 1, 0, 0, 0, 0, 0, 0, 0],   # p1
                [1, 1, 1, 0, 0, 0, 0, 0, 0],   # c0
                [1, 1, 1, 1, 0, 0, 0, 0, 0],   # c1
                [1, 1, 0, 0, 1, 0, 0, 0, 0],   # r0
                [0, 0, 0, 0, 0, 1, 0, 0, 0],   # pair 0: p0, nothing of pair 1
                [0, 0, 0, 0, 0, 1, 1, 0, 0],   # c0
                [0, 0, 0, 0, 0, 1, 0, 1, 0],   # r0
                [0, 0, 0, 0, 0, 1, 0, 1, 1]]   # r1
    assert attention_mask(stand_in(), batch)[0, 0].int().tolist() == expected


def test_rows_end_in_padding_that_sees_only_padding():
    # Budget 4 forces two rows: [3 4 6 2 2] and [5 7 8 9 pad]; the pad is row 1's pair -1.
    batch = collate_shared([pair([5], [7], [8, 9]), pair([3, 4], [6, 2], [2])], 0, packing=True, max_tokens_per_row=4)
    assert batch["input_ids"].tolist() == [[3, 4, 6, 2, 2], [5, 7, 8, 9, 0]]
    assert batch["pair_ids"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 0, 0, -1]]
    assert batch["response_positions"].tolist() == [[5, 6, 0], [1, 2, 3], [5, 7, 8], [1, 4, 0]]
    mask = attention_mask(stand_in(), batch)[1, 0]
    assert mask[4].int().tolist() == [0, 0, 0, 0, 1] and not mask[:4, 4].any()


def test_eager_mask_is_additive():
    batch = collate_shared([pair([5, 6], [7], [8])], 0)
    mask = attention_mask(stand_in("eager"), batch)[0, 0]
    low = torch.finfo(torch.float32).min
    assert mask.tolist() == [[0, low, low, low], [0, 0, low, low], [0, 0, 0, low], [0, 0, low, 0]]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [None, 12, 40])
def test_packer_fills_rows_within_budget_and_places_every_pair_once(seed, budget):
    generator = random.Random(seed)
    lengths = [generator.randint(3, 30) for _ in range(generator.randint(1, 16))]
    rows = pack_pairs(lengths, budget)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    limit = max(lengths) if budget is None else budget
    for row in rows:
        # Only a pair longer than the budget may exceed it, and then alone.
        assert sum(lengths[i] for i in row) <= limit or len(row) == 1
    if budget is None:  # first-fit: no two rows could have been merged
        assert all(sum(lengths[i] for i in a) + sum(lengths[i] for i in b) > limit
                   for n, a in enumerate(rows) for b in rows[n + 1:])


def test_first_fit_decreasing_by_hand():
    assert pack_pairs([3, 5, 2, 4], 7) == [[1, 2], [3, 0]]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="non-empty prompt.*prefix_sharing false"):
        collate_shared([pair([], [7], [8])], 0)


def outputs_and_grads(model, compute, batch):
    """(logps, mean_logits, n_tokens), a DPO loss and every parameter's gradient of that loss."""
    model.zero_grad()
    logps, mean_logits, n_tokens = compute(model, batch)
    chosen, rejected = logps.chunk(2)
    reference = torch.linspace(-30.0, -10.0, logps.numel()).chunk(2)  # a fixed reference that differs per row
    loss = sigmoid_loss(chosen, rejected, *reference, beta=0.5)[0].mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return (logps.detach(), mean_logits, n_tokens, loss.detach()), grads


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("compute", [naive_logps, lambda m, b: lean_logps(m, b, chunk_size=5)], ids=["naive", "lean"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_shared_layout_equals_padded(fixture, implementation, compute, packing, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), attn_implementation=implementation)
    assert shared_layout_unsupported(model) is None
    padded, padded_grads = outputs_and_grads(model, compute, collate_pairs(PAIRS, 0))
    # Pairs of 12, 9, 8, 4 and 13 tokens; budget 25 packs them longest first: 13 + 12, then 9 + 8 + 4.
    shared_batch = collate_shared(PAIRS, 0, packing=packing, max_tokens_per_row=25)
    assert shared_batch["pairs_per_row"].tolist() == ([1, 1, 1, 1, 1] if not packing else [2, 3])
    shared, shared_grads = outputs_and_grads(model, compute, shared_batch)
    assert padded[2].tolist() == [2, 7, 1, 1, 3, 2, 1, 4, 1, 6]  # n_tokens: chosen, then rejected
    for name, expected, actual in zip(["logps", "mean_logits", "n_tokens", "loss"], padded, shared):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=name)
    assert shared_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif("ATEN_CPU_CAPABILITY" in os.environ,
                    reason="FlexAttention on CPU compiles C++ through inductor for the machine's own CPU; with "
                           "ATEN_CPU_CAPABILITY forcing another kernel set it fails (default) or crashes (avx2)")
def test_flex_attention_forward_equals_padded(tiny_llama):
    # CPU: forward only (no FlexAttention backward on CPU in torch 2.13), so a reference pass, not training.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="flex_attention")
    with torch.no_grad():
        padded = lean_logps(model, collate_pairs(PAIRS, 0))
        shared = lean_logps(model, collate_shared(PAIRS, 0, packing=True, max_tokens_per_row=25))
    for expected, actual in zip(padded, shared):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bf16", ["weights", "autocast"])
def test_bf16_shared_layout_matches_padded_to_bf16_rounding(tiny_llama, bf16):
    # bf16 rounds each matmul, and the two layouts run matmuls of other shapes (other kernels, other
    # summation orders): equal to a few units of bf16 rounding, on any CPU kernel set.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16 if bf16 == "weights" else None)
    assert shared_layout_unsupported(model) is None
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16 == "autocast"):
        padded = lean_logps(model, collate_pairs(PAIRS, 0))
        shared = lean_logps(model, collate_shared(PAIRS, 0, packing=True, max_tokens_per_row=25))
    assert padded[0].dtype == shared[0].dtype == torch.float32
    torch.testing.assert_close(shared[0], padded[0], rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(shared[2], padded[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_layout_unsupported_catches_a_model_that_drops_the_mask(tiny_llama, tiny_gpt2, dtype):
    # In bf16 too: its tolerance is wider (bf16 rounding), and a dropped mask is far outside it.
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=dtype)
    # The decoder is called without the custom mask: causal attention over the whole row instead.
    llama.model.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "attention_mask": None}),
                                          with_kwargs=True)
    assert "ignores the shared layout's attention mask" in shared_layout_unsupported(llama)
    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=dtype)
    gpt2.transformer.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "position_ids": None}),
                                               with_kwargs=True)
    assert "ignores the shared layout's attention mask or position ids" in shared_layout_unsupported(gpt2)


def test_shared_layout_unsupported_reports_a_mask_the_model_rejects(tiny_llama):
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama)

    def reject(module, args, kwargs):
        if kwargs.get("attention_mask") is not None and kwargs["attention_mask"].dim() == 4:
            raise ValueError("4D masks are not supported")

    llama.model.register_forward_pre_hook(reject, with_kwargs=True)
    assert "cannot take the shared layout's 4D attention mask" in shared_layout_unsupported(llama)


def test_fit_refuses_prefix_sharing_on_a_model_that_drops_the_mask(tiny_llama, tmp_path):
    llama = mask_dropping_llama(tiny_llama)
    data = PreferenceDataModule(text_rows(4), tokenizer=tiny_llama, batch_size=2, max_length=64,
                                max_prompt_length=32, prefix_sharing=True)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="--data.prefix_sharing: .* Set --data.prefix_sharing false"):
        trainer.fit(DPOModule(llama), data)  # before any step


def mask_dropping_llama(path: str) -> torch.nn.Module:
    """A Llama whose decoder is called without the custom mask: causal attention over the whole row instead."""
    llama = AutoModelForCausalLM.from_pretrained(path)
    llama.model.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "attention_mask": None}),
                                          with_kwargs=True)
    return llama


@pytest.mark.parametrize("drops_mask", [False, True])
def test_auto_picks_packed_prefix_sharing_when_the_probe_passes_and_says_why(tiny_llama, tmp_path, drops_mask,
                                                                            caplog):
    # The default (`auto`): the fastest exact layout for this model, the choice and its reason logged once.
    model = mask_dropping_llama(tiny_llama) if drops_mask else AutoModelForCausalLM.from_pretrained(tiny_llama)
    data = PreferenceDataModule(text_rows(8), tokenizer=tiny_llama, batch_size=4, max_length=64, max_prompt_length=32)
    seen = []

    class Layouts(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((batch["layout"], batch["input_ids"].shape[0]))

    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, callbacks=[Layouts()])
    with caplog.at_level("INFO"):
        trainer.fit(DPOModule(model), data)
    lines = [r.getMessage() for r in caplog.records if "batch layout" in r.getMessage()]
    assert len(lines) == 1
    if drops_mask:
        assert seen == [("padded", 8)] * 2  # 4 pairs: 8 rows
        assert "padded (--data.prefix_sharing auto: LlamaForCausalLM" in lines[0] and "ignores" in lines[0]
    else:
        assert [layout for layout, _ in seen] == ["shared"] * 2 and all(rows < 4 for _, rows in seen)  # packed
        assert "shared (prefix sharing, packed" in lines[0]


def test_a_shared_batch_from_another_collator_is_refused_for_a_model_that_drops_the_mask(tiny_llama, tmp_path):
    # The probe runs for the layout each batch declares, whoever collated it: not only the data module's.
    data = PreferenceDataModule(text_rows(4), tokenizer=tiny_llama, max_length=64, max_prompt_length=32)
    data.setup("fit")
    loader = torch.utils.data.DataLoader(list(data.train_data), batch_size=2,
                                         collate_fn=lambda rows: collate_shared(rows, 0, packing=True))
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="--data.prefix_sharing: .* ignores the shared layout's attention mask"):
        trainer.fit(DPOModule(mask_dropping_llama(tiny_llama)), loader)


def test_data_module_batches_shared_and_packed_pairs(tiny_llama):
    with pytest.raises(ValueError, match="--data.packing .* --data.prefix_sharing true"):
        PreferenceDataModule(text_rows(4), tokenizer=tiny_llama, prefix_sharing=False, packing=True)
    with pytest.raises(ValueError, match="--data.packing_max_tokens 64 needs --data.packing true"):
        PreferenceDataModule(text_rows(4), tokenizer=tiny_llama, packing=False, packing_max_tokens=64)
    with pytest.raises(ValueError, match="--data.prefix_sharing must be true, false or auto, got 'yes'"):
        PreferenceDataModule(text_rows(4), tokenizer=tiny_llama, prefix_sharing="yes")
    data = PreferenceDataModule(text_rows(6), tokenizer=tiny_llama, batch_size=6, max_length=64,
                                max_prompt_length=32, prefix_sharing=True, packing=True)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["labels"].shape[0] == 12 and batch["pairs_per_row"].sum() == 6
    assert batch["input_ids"].shape[1] <= 64 and len(batch["pairs_per_row"]) < 6


@pytest.mark.parametrize("options", [{}, {"lean_logps": False}, {"lora_r": 4}], ids=["lean", "naive", "lora"])
def test_module_step_on_a_packed_batch_equals_the_padded_step(tiny_llama, options):
    # module.py only calls naive_logps / lean_logps: its loss, metrics and gradients compose untouched,
    # with LoRA too (the reference is the policy with its adapter off).
    results = []
    for batch in (collate_pairs(PAIRS, 0), collate_shared(PAIRS, 0, packing=True, max_tokens_per_row=25)):
        torch.manual_seed(0)
        module = DPOModule(tiny_llama, logps_chunk_size=4, **options)
        with torch.no_grad():
            module.policy.lm_head.weight.mul_(1.5)  # the policy differs from the reference
        loss = module._shared_step(batch, "train")
        loss.backward()
        metrics = {name: metric.compute() for name, metric in module.train_metrics.items()
                   if metric.update_count}
        results.append((loss.detach(), metrics, {n: p.grad for n, p in module.policy.named_parameters()
                                                 if p.requires_grad}))
    (loss, metrics, grads), (packed_loss, packed_metrics, packed_grads) = results
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-5)
    for name, value in metrics.items():
        torch.testing.assert_close(packed_metrics[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def sliding_mistral(implementation: str = "sdpa") -> torch.nn.Module:
    """A 2-layer Mistral whose layers attend over the last 12 positions only."""
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=12, max_position_embeddings=128)
    config._attn_implementation = implementation
    return AutoModelForCausalLM.from_config(config).eval()


def forty_token_pairs() -> list[dict]:
    generator = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, 96, (n,), generator=generator).tolist()

    return [pair(tokens(16), tokens(10), tokens(14)), pair(tokens(5), tokens(20), tokens(15))]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("compute", [naive_logps, lean_logps], ids=["naive", "lean"])
def test_sliding_window_shared_layout_equals_the_plain_forward(implementation, compute):
    # Defect 1 of issue 20: the shared layout's mask had no window, so on 40-token pairs a window of 12
    # was ignored (the padded layout gave -123.68, the shared one -114.90). The oracle: the model's own
    # forward on each prompt + response alone, log-softmax at the labels.
    model, pairs = sliding_mistral(implementation), forty_token_pairs()
    assert shared_layout_unsupported(model) is None
    expected = []
    with torch.no_grad():
        for side in ("chosen_input_ids", "rejected_input_ids"):
            for row in pairs:
                ids = torch.tensor([row["prompt_input_ids"] + row[side]])
                logits = model(input_ids=ids).logits[0, len(row["prompt_input_ids"]) - 1 : -1].log_softmax(-1)
                expected.append(logits.gather(-1, torch.tensor(row[side])[:, None]).sum())
        padded = compute(model, collate_pairs(pairs, 0))[0]
        shared = compute(model, collate_shared(pairs, 0))[0]
        packed = compute(model, collate_shared(pairs, 0, packing=True, max_tokens_per_row=100))[0]
    for actual in (padded, shared, packed):
        torch.testing.assert_close(actual, torch.stack(expected), rtol=1e-5, atol=1e-4)


def test_probe_reaches_past_the_sliding_window(monkeypatch):
    # A mask without the window (the mask before issue 20) must be refused: the probe's pairs are longer
    # than the window. Before, they were 9 tokens at most, shorter than any window.
    model = sliding_mistral()
    assert shared_layout_unsupported(model) is None
    windowed = layouts.visible
    monkeypatch.setattr(layouts, "visible", lambda batch, b, q, k, window=None: windowed(batch, b, q, k))
    assert "ignores the shared layout's attention mask" in shared_layout_unsupported(model)


def stand_in(implementation: str = "sdpa") -> SimpleNamespace:
    """A stand-in model for `attention_mask`, which reads only its attention implementation, layer kinds and dtype."""
    config = SimpleNamespace(_attn_implementation=implementation)
    config.get_text_config = lambda: config  # no layer kinds, no window: one causal mask
    return SimpleNamespace(config=config, dtype=torch.float32)


@pytest.mark.parametrize("budget", [None, 13, 100])
def test_shared_pairs_reads_back_the_pairs_a_shared_batch_holds(budget):
    # The layout check reruns a shared batch's pairs padded: they must come back whole, in batch order.
    batch = collate_shared(PAIRS, 0, packing=budget is not None, max_tokens_per_row=budget)
    assert shared_pairs(batch) == PAIRS
