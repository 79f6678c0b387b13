"""`sequence_logps` against values worked out by hand and against cross-entropy, and the lean log-prob
path (`dpo_lightning/logps.py`) against the full-logits path it replaces.

Lean must equal naive in float32 for log-probs, mean logits, token counts and every parameter's
gradient (1e-5), on a tiny Llama (untied head) and a tiny GPT-2 (head tied to the embedding), with a LoRA
adapter on the head, with Gemma 2's logit soft-capping, and under bf16 autocast; it must call the head
only on labelled positions, never more than `chunk_size` at a time; and a model whose logits it cannot
reproduce (Granite's `logits_scaling`) must fall back to the naive path. The output head alone
(`head_logps`) must equal the full logits computed in the test (log-probs, mean logits, gradients of the
hidden states, weight and bias; with a logit scale, a soft-cap, a tied weight, in bf16, with chunk sizes that
do not divide N), hold no tensor larger than a chunk's logits and run four head-sized matmuls. Tiny models
from configs (no network); the last tests run the benchmark scripts' `--quick` modes.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from conftest import BF16_RTOL
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM

from dpo_lightning import DPOModule
from dpo_lightning.training.logps import LogitTransform, head_logps, lean_logps, lean_unsupported, naive_logps, sequence_logps

IGNORE_INDEX = -100
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sequence_logps_sums_labelled_tokens_only():
    # Vocab of 2. logits[t] = [ln 3, 0] gives p(0) = 3/4, [0, ln 3] gives p(1) = 3/4.
    # labels [-100, 0, 1, -100]: logits[0] scores label 0 (3/4), logits[1] scores label 1 (3/4);
    # logits[2] would score a masked position and logits[3] scores nothing.
    ln3 = math.log(3)
    logits = torch.tensor([[[ln3, 0.0], [0.0, ln3], [9.0, -9.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1, IGNORE_INDEX]])
    logps, n_tokens = sequence_logps(logits, labels)
    torch.testing.assert_close(logps, torch.tensor([2 * math.log(0.75)]))
    assert n_tokens.tolist() == [2]


def test_sequence_logps_equals_cross_entropy_and_is_float32_from_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    expected = -F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").sum(-1)
    logps, n_tokens = sequence_logps(logits, labels)
    torch.testing.assert_close(logps, expected)
    assert n_tokens.tolist() == [4, 4, 2]
    # bf16 logits are upcast before the log-softmax: exactly the float32 result on the rounded logits.
    bf16_logps, _ = sequence_logps(logits.bfloat16(), labels)
    assert bf16_logps.dtype == torch.float32
    torch.testing.assert_close(bf16_logps, sequence_logps(logits.bfloat16().float(), labels)[0], rtol=0, atol=0)


def make_batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    """6 rows of 40 tokens: prompts of 5-15 tokens (labels -100), rows 3-5 right-padded from position 30."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (6, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[3:, 30:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for row, prompt_length in enumerate([5, 7, 9, 11, 13, 15]):
        labels[row, :prompt_length] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def outputs_and_grads(model: torch.nn.Module, compute, batch) -> tuple[tuple[torch.Tensor, ...], dict]:
    """(logps, mean_logits, n_tokens) and every trainable parameter's gradient of a weighted sum of the logps."""
    model.zero_grad()
    logps, mean_logits, n_tokens = compute(model, batch)
    # Different weights per row, signs included, as a DPO loss gives them.
    (logps * torch.linspace(-1.0, 2.0, logps.numel())).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return (logps.detach(), mean_logits, n_tokens), grads


def assert_lean_equals_naive(model: torch.nn.Module, batch, chunk_size: int = 7) -> None:
    naive, naive_grads = outputs_and_grads(model, naive_logps, batch)
    lean, lean_grads = outputs_and_grads(model, lambda m, b: lean_logps(m, b, chunk_size), batch)
    for expected, actual in zip(naive, lean):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert lean_grads.keys() == naive_grads.keys() and naive_grads
    for name, grad in naive_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_lean_equals_naive_logps_and_gradients(fixture, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture))  # eval: no dropout
    assert lean_unsupported(model) is None
    # chunk_size 7 does not divide the 150 labelled tokens: a partial last chunk is exercised too.
    assert_lean_equals_naive(model, make_batch())


def test_lean_equals_naive_with_lora_on_the_tied_output_head(tiny_gpt2):
    # GPT-2's head shares its weight with the embedding; LoRA on it adds a delta to the head only.
    config = LoraConfig(r=4, target_modules=["c_attn", "lm_head"], init_lora_weights=False)  # B != 0: A gets grads
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_gpt2), config)
    assert_lean_equals_naive(model, make_batch())


def test_lean_equals_naive_with_gemma2_logit_softcapping():
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(config).eval()
    assert lean_unsupported(model) is None
    assert_lean_equals_naive(model, make_batch())


def test_a_model_with_an_unmodelled_logit_scale_falls_back_to_naive(tmp_path):
    # Granite divides its logits by `logits_scaling`, which the lean path does not apply.
    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0)
    GraniteForCausalLM(config).save_pretrained(tmp_path)
    assert "not its output head applied to its decoder's hidden states" in lean_unsupported(
        GraniteForCausalLM.from_pretrained(tmp_path))
    with pytest.warns(UserWarning, match="lean_logps: .* using the full-logits path"):
        model = DPOModule(str(tmp_path))
    assert not model.uses_lean_logps


def test_a_model_whose_forward_is_not_reproducible_is_named_so_not_as_a_logit_transform(tiny_llama):
    # flex_attention on CPU (torch 2.13) gives other values on the same 8 tokens at each call: the fallback said the
    # model has a logit transform. Here an attention output that moves by a fresh random amount at every call.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, output: (output[0] + torch.randn_like(output[0]), *output[1:]))
    reason = lean_unsupported(model)
    assert reason.startswith("LlamaForCausalLM gives other logits when run twice on the same 8 tokens "
                             "(attn_implementation='sdpa' on cpu)"), reason
    assert "'sdpa' or 'eager'" in reason


def test_head_runs_only_on_labelled_positions_in_chunks(tiny_llama):
    # A hooked head is called as a module, chunk by chunk (the linear head's own path: the test below).
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = make_batch()
    rows_seen = []
    model.lm_head.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    logps, _, n_tokens = lean_logps(model, batch, chunk_size=32)
    n_labelled = int((batch["labels"][:, 1:] != -100).sum())
    # Response tokens: 40 - prompt for rows 0-2, 30 - prompt for the padded rows 3-5:
    # 35 + 33 + 31 + 19 + 17 + 15 = 150 of the 6 x 40 = 240 positions.
    assert n_labelled == n_tokens.sum() == 150
    assert rows_seen == [32, 32, 32, 32, 22]  # 150 = 4 x 32 + 22
    logps.sum().backward()  # backward recomputes each chunk once, in some order
    assert sorted(rows_seen[5:]) == [22, 32, 32, 32, 32]


def test_rows_without_labelled_tokens_give_zero_and_stay_differentiable(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = make_batch()
    batch["labels"][:] = -100
    logps, mean_logits, n_tokens = lean_logps(model, batch)
    assert logps.tolist() == [0.0] * 6 and mean_logits.tolist() == [0.0] * 6 and n_tokens.tolist() == [0] * 6
    logps.sum().backward()  # an all-prompt micro-batch must not break the step


def test_bf16_autocast_gives_float32_logps_close_to_naive(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive, naive_grads = outputs_and_grads(model, naive_logps, batch)
        lean, lean_grads = outputs_and_grads(model, lean_logps, batch)
    assert lean[0].dtype == torch.float32
    # Both round the head's matmul to bf16 (8 bits of mantissa), on differently shaped inputs: close to a
    # few units of bf16 rounding, not equal. The head's gradient sums 150 tokens' bf16 products: 13 units.
    torch.testing.assert_close(lean[0], naive[0], rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(lean_grads["lm_head.weight"], naive_grads["lm_head.weight"], rtol=13 * 2 ** -8,
                               atol=13 * 2 ** -8)


# The output head alone (`head_logps`), against the full logits computed here: transform(hidden @ W^T + b) in
# the head's dtype, upcast, then log_softmax + gather and the mean, with autograd for the gradients.
TRANSFORMS = {"plain": LogitTransform(), "scale": LogitTransform(scale=0.0625),  # Cohere's 0.0625
              "softcap": LogitTransform(softcap=2.0), "scale+softcap": LogitTransform(scale=3.0, softcap=2.5)}


def oracle_head(hidden, weight, bias, targets, scale=None, softcap=None):
    """(log p(target) (M,), mean logit (M,)) from the full (M, V) logits."""
    logits = F.linear(hidden, weight, bias).float()
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1), logits.mean(-1)


def head_case(dtype=torch.float32, bias=False, n=150, hidden_size=16, vocab=96):
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(hidden_size, vocab, bias=bias)
    with torch.no_grad():  # logits of a few units, as a trained model's
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=generator))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=generator))
    hidden = torch.randn(n, hidden_size, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=generator)
    weights = torch.randn(n, generator=generator)  # both signs, as a DPO loss weighs the rows
    return head.to(dtype), hidden, targets, weights


def values_and_grads(compute, head, hidden, targets, weights):
    """compute() -> (logps, mean_logits); with the gradients of sum(weights * logps) for hidden and the head."""
    hidden.grad = None
    head.zero_grad()
    logps, mean_logits = compute()
    (logps * weights).sum().backward()
    return [logps.detach(), mean_logits.detach(), hidden.grad] + [p.grad for p in head.parameters()]


@pytest.mark.parametrize("chunk_size", [7, 150, 1000])  # 150 = 21 x 7 + 3; one chunk; a chunk larger than N
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_head_equals_the_full_logits_values_and_gradients(transform, bias, chunk_size):
    head, hidden, targets, weights = head_case(bias=bias)
    t = TRANSFORMS[transform]
    ours = values_and_grads(lambda: head_logps(head, t, hidden, targets, chunk_size), head, hidden, targets, weights)
    expected = values_and_grads(lambda: oracle_head(hidden, head.weight, head.bias, targets, t.scale, t.softcap),
                                head, hidden, targets, weights)
    assert len(ours) == len(expected) == 4 + bias
    for name, actual, value in zip(["logps", "mean_logits", "hidden", "weight", "bias"], ours, expected):
        assert actual.dtype == value.dtype, name
        torch.testing.assert_close(actual, value, rtol=1e-5, atol=1e-5, msg=name)


def test_head_tied_to_the_embedding_sums_both_gradients():
    # The head's weight is also the embedding that makes the hidden states: its gradient has both shares.
    generator = torch.Generator().manual_seed(0)
    embedding = torch.nn.Embedding(96, 16)
    head = torch.nn.Linear(16, 96, bias=False)
    head.weight = embedding.weight
    ids, targets = torch.randint(0, 96, (2, 50), generator=generator)
    mix = torch.randn(16, 16, generator=generator) / 4
    weights = torch.randn(50, generator=generator)
    grads = []
    for compute in (lambda h: head_logps(head, LogitTransform(), h, targets, 16)[0],
                    lambda h: oracle_head(h, head.weight, None, targets)[0]):
        embedding.zero_grad()
        (compute(torch.tanh(embedding(ids) @ mix)) * weights).sum().backward()
        grads.append(embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_weights", "bf16_autocast"])
def test_head_in_bf16_rounds_as_the_full_logits_do(autocast):
    # bf16 weights, or float32 weights under bf16 autocast: both ways the head's matmul runs in bf16 (its
    # output rounded to 8 bits of mantissa), the log-softmax in float32; the oracle does the same on the
    # full logits. Gradients go through bf16 matmuls on differently grouped sums: a few bf16 units apart.
    head, hidden, targets, weights = head_case(dtype=torch.float32 if autocast else torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = values_and_grads(lambda: head_logps(head, LogitTransform(softcap=30.0), hidden, targets, 7),
                                head, hidden, targets, weights)
        expected = values_and_grads(lambda: oracle_head(hidden, head.weight, None, targets, softcap=30.0),
                                    head, hidden, targets, weights)
    for name, actual, value in zip(["logps", "mean_logits", "hidden", "weight"], ours, expected):
        assert actual.dtype == value.dtype, name
        tolerance = 4 * 2 ** -8 * value.abs().max().item()
        torch.testing.assert_close(actual, value, rtol=BF16_RTOL, atol=tolerance, msg=name)


class Shapes(TorchDispatchMode):
    """Records every op's name, input shapes and output shapes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        shapes = [tuple(x.shape) for x in outputs if isinstance(x, torch.Tensor)]
        self.calls.append((func.overloadpacket.__name__, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)],
                           shapes))
        return out


def test_head_holds_at_most_a_chunk_of_logits_and_runs_four_head_matmuls():
    # N = 150 positions, D = 8, V = 96, chunks of 32: the full logits would be 150 x 96 = 14,400 floats;
    # every tensor the head makes must be at most one chunk's, 32 x 96 = 3,072 (the weight's gradient is 768).
    # Recomputing the logits in backward costs one matmul more than autograd on the full logits: 4 x N x D x V
    # multiply-adds in all (logits, logits again, gradient of the hidden states, gradient of the weight).
    head, hidden, targets, weights = head_case(hidden_size=8)
    with Shapes() as record:
        logps, _ = head_logps(head, LogitTransform(), hidden, targets, 32)
        (logps * weights).sum().backward()
    assert max(math.prod(shape) for _, _, outputs in record.calls for shape in outputs) <= 32 * 96
    matmuls = [inputs for name, inputs, _ in record.calls if name.rstrip("_") in ("mm", "addmm")]
    assert sum(math.prod(inputs[-2]) * inputs[-1][-1] for inputs in matmuls) == 4 * 150 * 8 * 96  # m x k x n each


@pytest.mark.parametrize("loss_type, extra", [("sigmoid", {}), ("ipo", {}), ("simpo", {}),
                                              (["sigmoid", "sft"], {"rpo_alpha": 0.5})])
def test_module_loss_and_every_metric_equal_with_lean_and_naive(tiny_llama, loss_type, extra):
    batch = make_batch()
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = DPOModule(tiny_llama, loss_type=loss_type, lean_logps=lean, logps_chunk_size=16, **extra)
        with torch.no_grad():
            model.policy.lm_head.weight.mul_(1.5)  # the policy differs from the reference
        loss = model._shared_step(batch, "train")
        loss.backward()
        metrics = {name: metric.compute() for name, metric in model.train_metrics.items()
                   if metric.update_count}
        results.append((loss.detach(), metrics, {n: p.grad for n, p in model.policy.named_parameters()}))
    (naive_loss, naive_metrics, naive_grads), (lean_loss, lean_metrics, lean_grads) = results
    torch.testing.assert_close(lean_loss, naive_loss, rtol=1e-5, atol=1e-5)
    assert lean_metrics.keys() == naive_metrics.keys() and "logits/chosen" in lean_metrics
    for name, value in naive_metrics.items():
        torch.testing.assert_close(lean_metrics[name], value, rtol=1e-5, atol=1e-5, msg=name)
    for name, grad in naive_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_benchmark_quick_mode_runs():
    # The smoke test of benchmarks/bench_dpo.py: a small model, 2 timed steps per mode, one round.
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_dpo.py"), "--quick"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for mode in ("naive", "lean", "lora", "gradient_checkpointing"):
        assert f"\n{mode} " in result.stdout or f"| {mode} " in result.stdout, result.stdout


def test_head_benchmark_quick_mode_runs():
    # benchmarks/bench_head.py's smoke test: small shapes, 2 runs of each, no memory subprocesses.
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_head.py"), "--quick",
                             "--no-memory"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| bare |" in result.stdout and "| ours |" in result.stdout, result.stdout
