"""Shared fixtures: a tokenizer whose ids are ASCII codes, and tiny models saved to temp folders.

Nothing here touches the network: models are built from a config and saved with `save_pretrained`, then
loaded by path, the way a user's hub model would be.
"""

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
