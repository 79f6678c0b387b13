"""Tokenization throughput of PreferenceDataModule on the HH slice: a cold setup, then a cached one.

    python benchmarks/tokenize_hh.py [--data ../shared/data/hh-rlhf/harmless-base-test-1500.jsonl.gz]

A byte-level BPE tokenizer (vocab 8,000) is trained on the slice first, as a stand-in for GPT-2's
(no hub here). The `datasets` cache goes to a fresh temp folder, so the first setup tokenizes
everything and the second must read it back.
"""

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-1500.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT))
    args = parser.parse_args()
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp()  # before importing datasets: a cold cache

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from dpo_lightning import PreferenceDataModule

    with gzip.open(args.data, "rt") as f:
        texts = [text for line in f for text in json.loads(line).values()]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=8000, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    for run in ("cold", "cached"):
        dm = PreferenceDataModule(dataset=args.data, dataset_format="hh", tokenizer=tokenizer, max_length=512,
                                  max_prompt_length=128)
        start = time.perf_counter()
        dm.setup("fit")
        seconds = time.perf_counter() - start
        rows = dm.summary["train"]["rows"]
        print(f"{run:>6}: {rows} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s "
              f"(cache files: {len(dm.train_data.cache_files)})")


if __name__ == "__main__":
    main()
