"""Shared fixtures: a tokenizer whose ids are ASCII codes (and a chat template modelled on Qwen3's, with its
rendering written out by hand), tiny models saved to temp folders, and the helpers the module-level tests share:
a data module of `rows`, a quiet Trainer, a first batch, the response log-probs recomputed from a model's logits
(an oracle that calls no package code), and a callback recording each training batch's rows and the weights
around it.

Nothing here touches the network: models are built from a config and saved with `save_pretrained`, then
loaded by path, the way a user's hub model would be.
"""

import json

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

UNK, BOS, EOS = 0, 1, 2  # special ids; every other id is the ASCII code of its character


def ascii_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per character, id = ord(char); no pad token (like GPT-2); BOS added only if asked (like Llama)."""
    vocab = {"<unk>": UNK, "<s>": BOS, "</s>": EOS, **{chr(i): i for i in range(32, 127)}, "\n": 10}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def ids(text: str) -> list[int]:
    """The ids `ascii_tokenizer` gives `text`, worked out by hand: its ASCII codes."""
    return [ord(c) for c in text]


# Qwen3's chat template, cut down: a system block listing `tools` as JSON, assistant turns with their
# `tool_calls` and a <think> block (the `reasoning_content`; empty for the last turn), tool results as user turns,
# and the `enable_thinking` switch: false closes an empty <think> block in the generation prompt.
QWEN_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and (loop.last or m.reasoning_content) %}"
    "{{- '<think>\\n' + (m.reasoning_content or '') + '\\n</think>\\n\\n' }}{%- endif %}"
    "{%- if m.content is string %}{{- m.content }}{%- endif %}"
    "{%- for call in m.tool_calls or [] %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{%- if call.function.arguments is string %}{{- call.function.arguments }}"
    "{%- else %}{{- call.function.arguments | tojson }}{%- endif %}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """`ascii_tokenizer` (no BOS, as Qwen) with QWEN_TEMPLATE."""
    tokenizer = ascii_tokenizer()
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def qwen_text(messages: list[dict], tools: list | None = None, generation: bool = False,
              enable_thinking: bool | None = None) -> str:
    """QWEN_TEMPLATE rendered by hand: what each message, tool and switch becomes, written out."""
    out, first = "", messages[0]
    if tools:
        out += ("<|im_start|>system\n" + (first["content"] + "\n\n" if first["role"] == "system" else "")
                + "# Tools\n<tools>" + "".join("\n" + json.dumps(tool) for tool in tools) + "\n</tools><|im_end|>\n")
    elif first["role"] == "system":
        out += f"<|im_start|>system\n{first['content']}<|im_end|>\n"
    last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] == "user" or (m["role"] == "system" and i > 0):
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        elif m["role"] == "assistant":
            out += "<|im_start|>assistant\n"
            if i > last_query and (i == len(messages) - 1 or m.get("reasoning_content")):
                out += f"<think>\n{m.get('reasoning_content') or ''}\n</think>\n\n"
            out += m.get("content") or ""
            for call in m.get("tool_calls") or []:
                arguments = call["function"]["arguments"]
                arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
                name = call["function"]["name"]
                out += f'\n<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'
            out += "<|im_end|>\n"
        elif m["role"] == "tool":
            out += f"<|im_start|>user\n<tool_response>\n{m['content']}\n</tool_response><|im_end|>\n"
    if generation:
        out += "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if enable_thinking is False else "")
    return out


def qwen_pair(prompt: list[dict], chosen: dict, rejected: dict, tools: list | None = None,
              enable_thinking: bool | None = None) -> tuple[list[int], list[int], list[int]]:
    """The ids a conversation trains on under QWEN_TEMPLATE: the prompt with the generation prompt, and each
    answer (one message) as the rest of the whole conversation's rendering."""
    head = qwen_text(prompt, tools, True, enable_thinking)
    wholes = [qwen_text([*prompt, answer], tools, False, enable_thinking) for answer in (chosen, rejected)]
    assert all(whole.startswith(head) for whole in wholes)  # the oracle's own premise
    return ids(head), ids(wholes[0][len(head):]), ids(wholes[1][len(head):])


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer Llama (width 64) whose tokenizer adds BOS, saved to a folder; returns the path."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=BOS, eos_token_id=EOS)
    return _save(LlamaForCausalLM(config), ascii_tokenizer(add_bos=True), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A 2-layer GPT-2 (width 64, dropout 0.1) with no pad token and no BOS, saved to a folder."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=EOS, eos_token_id=EOS)
    return _save(GPT2LMHeadModel(config), ascii_tokenizer(), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def other_llama(tmp_path_factory, tiny_llama) -> str:
    """The same architecture as `tiny_llama` with other random weights: a reference that differs."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other_llama")
    LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_llama)).save_pretrained(path)
    return str(path)


def rows(n: int) -> dict[str, list[str]]:
    """n preference pairs of different lengths, as an in-memory dict of columns."""
    return {"prompt": [f"Q{i}: say {'ab' * (i % 3 + 1)}?" for i in range(n)],
            "chosen": [f" {'ab' * (i % 3 + 1)}" for i in range(n)],
            "rejected": [f" no{'!' * (i % 4)}" for i in range(n)]}


# bf16 keeps 8 significant bits: two computations of one value agree to a few units of 2^-8, relative.
BF16_RTOL = 4 * 2 ** -8


def data_module(n: int = 16, eval_n: int = 4, dataset: dict | None = None, **kwargs):
    """`rows(n)` (or `dataset`) to train on and `rows(eval_n)` to validate on, batches of 4, the ASCII tokenizer."""
    from dpo_lightning import PreferenceDataModule

    options = {"tokenizer": ascii_tokenizer(), "max_length": 48, "max_prompt_length": 24, "batch_size": 4, **kwargs}
    return PreferenceDataModule(dataset=dataset or rows(n), eval_dataset=rows(eval_n) if eval_n else None, **options)


def quiet_trainer(root, max_steps: int = 4, **kwargs) -> L.Trainer:
    """A CPU Trainer without logger, progress bar, summary or sanity check, writing under `root`; the training
    metrics logged at every step (each step's own values in `callback_metrics`)."""
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
               "num_sanity_val_steps": 0, "log_every_n_steps": 1, **kwargs}
    return L.Trainer(max_steps=max_steps, default_root_dir=root, **options)


def first_batch(dm) -> dict[str, torch.Tensor]:
    """The first training batch of a data module."""
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs (2B,) of each row's labelled tokens, and their counts (2B,), from the model's logits.

    Written from the rule, not from logps.py: the logits at t predict the token at t + 1.
    """
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (2B, T-1)
    return (picked * mask).sum(-1), mask.sum(-1)


class RecordBatches(L.Callback):
    """Each training batch's row ids (`batches`), and the policy's weights before (`before`) and after (`after`) it."""

    def __init__(self, weights: bool = False):
        self.weights, self.batches, self.before, self.after = weights, [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch["row_ids"].tolist())
        if self.weights:
            self.before.append({k: v.clone() for k, v in module.policy.state_dict().items()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.weights:
            self.after.append({k: v.clone() for k, v in module.policy.state_dict().items()})
