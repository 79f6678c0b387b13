"""The tokenizer a run uses, decided once: the one named, else the model's (`tokenizer_source`), and pad = eos
where it has no pad token (`with_pad_token`). The data module, the export, `inspect-data` and reward models all
ask here."""

import json
import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dpo_lightning.utils.locate import model_source


def with_pad_token(tokenizer: PreTrainedTokenizerBase, need_eos: bool = True) -> PreTrainedTokenizerBase:
    """`tokenizer` with pad = eos where it has no pad token (padding is masked, so its id is free); checked for
    an EOS, which every training response ends with (`need_eos`; a reward model's tokenizer needs only a pad)."""
    if tokenizer.eos_token_id is None and (need_eos or tokenizer.pad_token_id is None):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one before training")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer by name or path (no remote code), through `with_pad_token`."""
    source = model_source(name_or_path, "the tokenizer")
    return with_pad_token(AutoTokenizer.from_pretrained(source, trust_remote_code=False))


def tokenizer_source(tokenizer: str | None, model_name_or_path: str | None) -> str:
    """The tokenizer to load: `tokenizer` when named, else the model's, so that a config names the model once.

    A peft adapter folder's tokenizer is its base model's (`base_model_name_or_path` in `adapter_config.json`), as
    for the model training loads under the adapter.
    """
    if tokenizer:
        return tokenizer
    if not isinstance(model_name_or_path, str):
        raise ValueError("no tokenizer: pass PreferenceDataModule(tokenizer=...) (--data.tokenizer), or attach the "
                         "data module to a Trainer fitting a DPOModule built from a path")
    adapter_config = os.path.join(model_name_or_path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        with open(adapter_config) as f:
            return json.load(f)["base_model_name_or_path"]
    return model_name_or_path
