"""Every causal-LM architecture in every mode, against its own plain forward (issue 20's matrix).

Tiny random configs (width 32, 2 layers, the ASCII tokenizer's 128 ids) of 24 architectures: sliding
windows (Mistral, Phi-3, Starcoder2, Mixtral), mixed sliding and global layers (Gemma 2, Gemma 3, Qwen2 with
`use_sliding_window` and `max_window_layers`), MoE (Mixtral, Qwen2-MoE), alibi (Bloom, MPT), soft-capping
(Gemma 2), a logit scale (Cohere) and Granite's logit divisor, tied and untied heads, and dropout set in the
config wherever the config takes one (OPT's `dropout`, Falcon's and Bloom's `hidden_dropout`,
`attention_dropout`, GPT-2's `resid_pdrop`...; MPT's config types `attn_pdrop` as an int).

Each architecture trains two optimizer steps (plain SGD, so the weights after them are the gradients,
summed) through a Trainer in each mode: the default (lean log-probs, the layout `auto` picks), full logits,
lean on the padded layout, prefix sharing, packing, a precomputed reference and LoRA. The ground truth is
computed here from the model's plain forward, one sequence at a time with no padding (`oracle_logps`), in
eval mode (no dropout: `disable_dropout` is on), the DPO loss written out, and `torch.optim.SGD`: each
step's mean chosen log-prob and loss, and the trained weights, must match. A layout the model cannot take
must be refused with our own message (`REFUSED`), never run silently wrong.

Online DPO trains the pairs its policy samples, in the default mode, with LoRA and in bf16-mixed, on a few
architectures: the sampled pairs (as the data module batches them) go through the same oracle.

The default run covers every architecture in the default mode (the probe, the layout `auto` picks, two
steps), the explicit shared and packed layouts on a few, and online DPO on Llama; `pytest -m architectures`
runs every mode of every architecture and online DPO's modes on a few (CI runs it: .ci/run, and the online bf16
cases again under ATEN_CPU_CAPABILITY=default).
"""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from dpo_lightning import DPOModule
from dpo_lightning.data.layouts import shared_layout_unsupported

from conftest import BF16_RTOL, data_module, quiet_trainer

WIDTH = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
WINDOW = 8  # the HH-like rows of `conftest.rows` make pairs of 20-30 tokens: longer than the window
DROP = 0.1
ARCHITECTURES = {
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                 resid_pdrop=DROP, embd_pdrop=DROP, attn_pdrop=DROP),
    "llama": dict(model_type="llama", **WIDTH, attention_dropout=DROP),
    "mistral": dict(model_type="mistral", **WIDTH, sliding_window=WINDOW, attention_dropout=DROP),
    "qwen2": dict(model_type="qwen2", **WIDTH, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
                  attention_dropout=DROP),
    "qwen3": dict(model_type="qwen3", **WIDTH, head_dim=8, attention_dropout=DROP),
    "gemma": dict(model_type="gemma", **WIDTH, head_dim=8, attention_dropout=DROP),
    "gemma2": dict(model_type="gemma2", **WIDTH, head_dim=8, sliding_window=WINDOW, final_logit_softcapping=5.0,
                   attn_logit_softcapping=20.0, attention_dropout=DROP),
    "gemma3": dict(model_type="gemma3_text", **WIDTH, head_dim=8, sliding_window=WINDOW, sliding_window_pattern=2,
                   attention_dropout=DROP),
    "phi": dict(model_type="phi", **WIDTH, resid_pdrop=DROP, embd_pdrop=DROP, attention_dropout=DROP),
    "phi3": dict(model_type="phi3", **WIDTH, sliding_window=WINDOW, resid_pdrop=DROP, embd_pdrop=DROP,
                 attention_dropout=DROP, pad_token_id=0),
    "opt": dict(model_type="opt", vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32, dropout=DROP,
                attention_dropout=DROP, pad_token_id=0),
    "gpt_neox": dict(model_type="gpt_neox", **WIDTH, hidden_dropout=DROP, attention_dropout=DROP,
                     tie_word_embeddings=False),
    "falcon": dict(model_type="falcon", vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   hidden_dropout=DROP, attention_dropout=DROP),
    "bloom": dict(model_type="bloom", vocab_size=128, hidden_size=32, n_layer=2, n_head=4, hidden_dropout=DROP,
                  attention_dropout=DROP),
    "mixtral": dict(model_type="mixtral", **WIDTH, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                    attention_dropout=DROP),
    "qwen2_moe": dict(model_type="qwen2_moe", **WIDTH, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                      num_experts=4, num_experts_per_tok=2, attention_dropout=DROP),
    "olmo2": dict(model_type="olmo2", **WIDTH, attention_dropout=DROP),
    "cohere": dict(model_type="cohere", **WIDTH, logit_scale=0.5, attention_dropout=DROP),
    "granite": dict(model_type="granite", **WIDTH, logits_scaling=2.0, residual_multiplier=0.5,
                    embedding_multiplier=2.0, attention_multiplier=0.2, attention_dropout=DROP),
    "stablelm": dict(model_type="stablelm", **WIDTH, hidden_dropout=DROP, attention_dropout=DROP),
    "starcoder2": dict(model_type="starcoder2", **WIDTH, sliding_window=WINDOW, residual_dropout=DROP,
                       embedding_dropout=DROP, attention_dropout=DROP),
    "gptj": dict(model_type="gptj", vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128,
                 resid_pdrop=DROP, embd_pdrop=DROP, attn_pdrop=DROP, tie_word_embeddings=False),
    "codegen": dict(model_type="codegen", vocab_size=128, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                    n_positions=128, n_ctx=128, resid_pdrop=DROP, embd_pdrop=DROP, attn_pdrop=DROP),
    "mpt": dict(model_type="mpt", vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=128,
                expansion_ratio=2),  # its config types attn_pdrop as an int: no dropout can be set
}
LINEAR_ATTENTION = dict(head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"])
# Under the `architectures` marker only, so the default run keeps its size: the 2026 small-model classes (Qwen3.5
# and Gemma 4 load through AutoModelForCausalLM from their multimodal configs), the hybrid and recurrent families,
# Llama-4's chunked attention and router, and OLMoE's router.
NEWER = {
    "qwen3_5": dict(model_type="qwen3_5", text_config=dict(**WIDTH, **LINEAR_ATTENTION, attention_dropout=DROP),
                    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)),
    # With its vision tower, per-layer inputs and key-value sharing (the last two layers reuse the first two's).
    "gemma4": dict(model_type="gemma4", audio_config=None, vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, patch_size=4, position_embedding_size=64, pooling_kernel_size=2), text_config=dict(
        **{**WIDTH, "num_hidden_layers": 4}, head_dim=8, global_head_dim=16, sliding_window=WINDOW,
        vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0, attention_dropout=DROP)),
    "qwen3_next": dict(model_type="qwen3_next", **WIDTH, **LINEAR_ATTENTION, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32, attention_dropout=DROP),
    "lfm2": dict(model_type="lfm2", **WIDTH, layer_types=["conv", "full_attention"]),
    "mamba": dict(model_type="mamba", vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2,
                  conv_kernel=3),
    "llama4_text": dict(model_type="llama4_text", **WIDTH, head_dim=8, intermediate_size_mlp=64, attention_chunk_size=WINDOW,
                        no_rope_layer_interval=2, num_local_experts=4, num_experts_per_tok=1, attention_dropout=DROP),
    "olmoe": dict(model_type="olmoe", **WIDTH, num_experts=4, num_experts_per_tok=2, attention_dropout=DROP),
}
ARCHITECTURES.update(NEWER)
# Built for other tests (test_lora.py) but outside the matrix: in training mode PhiMoE samples its experts
# (SparseMixer's Gumbel sampling), so no deterministic forward can be the oracle of its training steps.
SAMPLED_ROUTING = {"phimoe": dict(model_type="phimoe", **WIDTH, num_local_experts=4, num_experts_per_tok=2)}
# The shared layout's 4D mask and restarted position ids cannot reach alibi's biases, which Bloom and MPT compute
# from the 2D padding mask, nor stop a recurrent or convolutional state running along the row (Qwen3.5,
# Qwen3-Next, LFM2, Mamba): `shared_layout_unsupported` refuses them, `auto` keeps them padded.
REFUSED = {"bloom", "mpt", "qwen3_5", "qwen3_next", "lfm2", "mamba"}
FAST = ("llama", "gpt2", "mistral", "gemma2", "qwen2", "bloom")  # the explicit layouts in the default run
MODES = {"default": ({}, {}), "full": ({"lean_logps": False}, {}), "lean": ({}, {"prefix_sharing": False}),
         "shared": ({}, {"prefix_sharing": True, "packing": False}),
         "packing": ({}, {"prefix_sharing": True, "packing": True, "packing_max_tokens": 64}),
         "precompute": ({"precompute_ref_log_probs": True}, {}), "lora": ({"lora_r": 4}, {}),
         "all_linear": ({"lora_r": 4, "lora_target_modules": "all-linear"}, {})}
BETA, LR = 0.5, 0.5


def tiny_model(name: str) -> torch.nn.Module:
    """The architecture's tiny model, the same random weights at every call."""
    settings = dict({**ARCHITECTURES, **SAMPLED_ROUTING}[name])
    config = AutoConfig.for_model(settings.pop("model_type"), bos_token_id=1, eos_token_id=2, **settings)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def oracle_logps(model: torch.nn.Module, rows: list[dict]) -> torch.Tensor:
    """Summed log-probs (2B,) of each pair's chosen then rejected response, each sequence run alone: its logits
    at t, log-softmaxed, scored at the token t + 1, over the response's tokens."""
    scores = []
    for side in ("chosen_input_ids", "rejected_input_ids"):
        for row in rows:
            prompt, response = row["prompt_input_ids"], row[side]
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
            scores.append(logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).sum())
    return torch.stack(scores)


def plain_aux_loss(model: torch.nn.Module, rows: list[dict]) -> torch.Tensor | None:
    """The model's own router load-balancing loss (its forward's `aux_loss` with `output_router_logits=True`) on
    the padded batch of `rows`: prompt + chosen rows, then prompt + rejected rows, right-padded with a 0/1 mask."""
    sequences = [row["prompt_input_ids"] + row[side] for side in ("chosen_input_ids", "rejected_input_ids")
                 for row in rows]
    width = max(map(len, sequences))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss


def router_coefficient(model: torch.nn.Module) -> float:
    """TRL's default `router_aux_loss_coef`: the config's, for a mixture of experts (a config with
    `output_router_logits`); 0 for any other model."""
    config = model.config.get_text_config()
    return getattr(config, "router_aux_loss_coef", 0.0) if hasattr(config, "output_router_logits") else 0.0


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))), averaged over pairs (Rafailov et al. 2023, eq. 7)."""
    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()


class Record(L.Callback):
    """Each training step's row ids, loss (as returned, and as logged) and logged mean chosen log-prob."""

    def __init__(self):
        self.rows, self.losses, self.logged_losses, self.logps = [], [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rows.append(batch["row_ids"].tolist())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())
        self.logps.append(trainer.callback_metrics["train/logps/chosen"].clone())
        self.logged_losses.append(trainer.callback_metrics["train/loss"].clone())


def oracle_training(policy: torch.nn.Module, lora: bool, steps: list[list[dict]]) -> tuple[list, list]:
    """Two SGD steps of DPO on `policy` (a copy), the reference being its starting weights (with LoRA, the
    adapter off), plus a mixture of experts' router loss where its forward computes one (TRL's default
    coefficient); returns each step's loss and mean chosen log-prob."""
    policy = copy.deepcopy(policy).eval()  # eval: no dropout, as `disable_dropout` promises in training
    reference = None if lora else copy.deepcopy(policy)
    coef = router_coefficient(policy)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=LR)
    losses, logps = [], []
    for rows in steps:
        with torch.no_grad():
            if lora:
                with policy.disable_adapter():
                    reference_logps = oracle_logps(policy, rows)
            else:
                reference_logps = oracle_logps(reference, rows)
        policy_logps = oracle_logps(policy, rows)
        loss = dpo_loss(policy_logps, reference_logps)
        aux = plain_aux_loss(policy, rows) if coef else None
        loss = loss + coef * aux if aux is not None else loss  # Llama-4's forward computes none
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        logps.append(policy_logps.detach().chunk(2)[0].mean())
    return policy, losses, logps


def train_and_compare(name: str, mode: str, tmp_path) -> None:
    module_options, data_options = MODES[mode]
    module = DPOModule(tiny_model(name), beta=BETA, learning_rate=LR, optimizer=torch.optim.SGD,
                       ref_logps_cache_dir=str(tmp_path / "cache"), **module_options)
    start = copy.deepcopy(module.policy)
    data = data_module(8, eval_n=0, **data_options)
    record = Record()
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[record], enable_checkpointing=False)
    if name in REFUSED and data_options.get("prefix_sharing"):
        with pytest.raises(ValueError, match="--data.prefix_sharing: .*Set --data.prefix_sharing false"):
            trainer.fit(module, data)
        return
    trainer.fit(module, data)
    if not data_options:  # `auto`: the shared layout, packed, for every model its probe passes
        assert data.layout.name == ("padded" if name in REFUSED else "shared")
    by_id = {row["row_id"]: row for row in data.train_data}
    trained, losses, logps = oracle_training(start, "lora_r" in module_options, [[by_id[i] for i in ids]
                                                                                for ids in record.rows])
    torch.testing.assert_close(torch.stack(record.logps), torch.stack(logps), rtol=1e-4, atol=1e-4, msg="logps")
    torch.testing.assert_close(torch.stack(record.losses), torch.stack(losses), rtol=1e-4, atol=1e-5, msg="loss")
    before = dict(start.named_parameters())
    for (key, actual), expected in zip(module.policy.named_parameters(), trained.parameters()):
        if actual.requires_grad:  # the update must match to 1e-3 of its own size
            step, expected_step = actual.detach() - before[key], expected.detach() - before[key]
            scale = expected_step.abs().max().item()
            torch.testing.assert_close(step, expected_step, rtol=1e-3, atol=1e-3 * scale + 1e-7, msg=key)


# Every architecture; the newer ones under the `architectures` marker only.
EVERY = [pytest.param(name, marks=pytest.mark.architectures) if name in NEWER else name for name in ARCHITECTURES]


@pytest.mark.parametrize("name", EVERY)
def test_probe_refuses_exactly_the_architectures_that_need_it(name):
    reason = shared_layout_unsupported(tiny_model(name))
    assert (reason is not None) == (name in REFUSED), reason


@pytest.mark.parametrize("name", EVERY)
def test_default_mode_trains_as_the_plain_forward(name, tmp_path):
    train_and_compare(name, "default", tmp_path)


@pytest.mark.parametrize("mode", ["shared", "packing"])
@pytest.mark.parametrize("name", FAST)
def test_explicit_shared_layouts_are_exact_or_refused(name, mode, tmp_path):
    train_and_compare(name, mode, tmp_path)


@pytest.mark.architectures
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_mode_of_every_architecture(name, mode, tmp_path):
    train_and_compare(name, mode, tmp_path)


# --- Online DPO: the pairs the policy samples, trained as the plain forward would ----------------------------------

ONLINE_MODES = {"default": ({}, {}), "lora": ({"lora_r": 4}, {}), "bf16": ({}, {"precision": "bf16-mixed"})}


def text_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Length, then the characters: ties are rare, so every step has pairs."""
    return [len(c) + sum(map(ord, c)) % 89 / 89 for c in completions]


def train_online_and_compare(name: str, mode: str, tmp_path) -> None:
    """Online SGD steps: the pairs the data module batched (`pair_batch`), as sampled, go through the oracle's plain
    float32 forward; the logged loss and mean chosen log-prob and the weights must match it. In bf16-mixed, one
    step, from the same weights: to bf16's rounding (the update sums a few hundred bf16 products: a few units)."""
    module_options, trainer_options = ONLINE_MODES[mode]
    online = {"reward_funcs": "test_architectures.text_reward", "num_samples": 3, "max_new_tokens": 6}
    module = DPOModule(tiny_model(name), beta=BETA, learning_rate=LR, optimizer=torch.optim.SGD, online=online,
                       **module_options)
    start = copy.deepcopy(module.policy)
    data = data_module(8, eval_n=0)
    sampled, batch_pairs = [], data.pair_batch  # each step's pairs, as the online component hands them over
    data.pair_batch = lambda pairs: sampled.append(pairs) or batch_pairs(pairs)
    record, steps = Record(), 1 if mode == "bf16" else 2
    quiet_trainer(tmp_path, max_steps=steps, callbacks=[record], enable_checkpointing=False, **trainer_options).fit(
        module, data)
    assert len(sampled) == steps and all(len(pairs) >= 2 for pairs in sampled)  # pairs, not a stand-in for ties
    for pair in sum(sampled, []):  # short enough that rule 3 cut nothing: trained as sampled
        assert len(pair["prompt_input_ids"]) + max(len(pair["chosen_input_ids"]), len(pair["rejected_input_ids"])) <= 48
    trained, losses, logps = oracle_training(start, mode == "lora", sampled)
    bf16 = mode == "bf16"
    torch.testing.assert_close(torch.stack(record.logps), torch.stack(logps), msg="logps",
                               **(dict(rtol=BF16_RTOL, atol=0) if bf16 else dict(rtol=1e-4, atol=1e-4)))
    # The logged loss: online, the loss a step returns is its mean times its pairs (their weight in the step's mean).
    torch.testing.assert_close(torch.stack(record.logged_losses), torch.stack(losses), rtol=1e-4, atol=1e-5,
                               msg="loss")
    before = dict(start.named_parameters())
    for (key, actual), expected in zip(module.policy.named_parameters(), trained.parameters()):
        if actual.requires_grad:  # the update must match to 1e-3 of its own size (bf16: 2 x BF16_RTOL)
            step, expected_step = actual.detach() - before[key], expected.detach() - before[key]
            scale = expected_step.abs().max().item()
            tolerance = dict(rtol=0, atol=2 * BF16_RTOL * scale) if bf16 else dict(rtol=1e-3, atol=1e-3 * scale + 1e-7)
            torch.testing.assert_close(step, expected_step, **tolerance, msg=key)
    if bf16:  # bf16 really ran
        assert not torch.equal(torch.stack(record.logps), torch.stack(logps))


def test_online_default_mode_trains_its_own_samples_as_the_plain_forward(tmp_path):
    train_online_and_compare("llama", "default", tmp_path)


@pytest.mark.architectures
@pytest.mark.parametrize("mode", ONLINE_MODES)
@pytest.mark.parametrize("name", FAST)
def test_online_every_mode_of_a_few_architectures(name, mode, tmp_path):
    train_online_and_compare(name, mode, tmp_path)


@pytest.mark.architectures
@pytest.mark.parametrize("name", ["qwen3_5", "gemma4"])
def test_a_vision_language_checkpoint_trains_as_its_causal_lm(name, tmp_path):
    # Qwen3.5's and Gemma 4's hub checkpoints are their vision-language models; AutoModelForCausalLM loads them as
    # the classes the matrix trains (Qwen3.5's text model, Gemma 4's whole model): the same text logits.
    settings = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(settings.pop("model_type"), bos_token_id=1, eos_token_id=2, **settings)
    torch.manual_seed(0)
    multimodal = AutoModelForImageTextToText.from_config(config).eval()
    multimodal.save_pretrained(tmp_path)
    module = DPOModule(str(tmp_path))
    assert type(module.policy) is type(tiny_model(name))
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        torch.testing.assert_close(module.policy.eval()(input_ids=ids).logits, multimodal(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["opt", "falcon", "bloom", "llama", "gpt2"])
def test_disable_dropout_zeroes_dropout_read_from_the_config(name):
    # Defect 2 of issue 20: OPT applies F.dropout(p=config.dropout); only nn.Dropout modules were zeroed, so
    # two train-mode forwards of the policy differed (by 0.037 on OPT).
    policy = DPOModule(tiny_model(name)).policy
    assert policy.training
    ids = torch.arange(3, 30)[None]
    torch.testing.assert_close(policy(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=0, atol=0)
