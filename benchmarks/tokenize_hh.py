"""Preparation throughput of PreferenceDataModule on HH rows, against the tokenizer's own batched encode.

    python benchmarks/tokenize_hh.py [--data ../shared/data/hh-rlhf/harmless-base-test-1500.jsonl.gz]
                                     [--rows 20000] [--rounds 3] [--num-proc N]

The slice is repeated to `--rows` rows and written to a .jsonl file. A byte-level BPE tokenizer (vocab
8,000) is trained on the slice first, as a stand-in for GPT-2's (no hub here), and saved to a folder.
Two variants run alternately (A B A B ...), each in a fresh process with a fresh `datasets` cache:

- ours: `PreferenceDataModule(dataset=<the .jsonl>, dataset_format="hh").setup("fit")` cold: reading
  the file, splitting every dialogue, checking and tokenizing every row (then a second, cached setup).
- encode: the rows' prompt, chosen and rejected texts, split beforehand (not timed), each list encoded
  by one batched call `tokenizer(texts, add_special_tokens=False, split_special_tokens=True)` (text fields
  are text, as ours tokenizes them): the floor that tokenization alone costs.

Printed: medians over rounds of rows/s for each, their ratio, the rows, the CPU cores, torch's version.
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test-1500.jsonl.gz"
ASSISTANT = "\n\nAssistant:"


def child(variant: str, data: str, tokenizer_dir: str, num_proc: int | None) -> dict:
    """One timed run in this (fresh) process; returns its figures."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    if variant == "encode":
        with open(data) as f:
            rows = [json.loads(line) for line in f]
        cut = [row["chosen"].rfind(ASSISTANT) + len(ASSISTANT) for row in rows]
        texts = [[row["chosen"][:n] for row, n in zip(rows, cut)], [row["chosen"][n:] for row, n in zip(rows, cut)],
                 [row["rejected"][n:] for row, n in zip(rows, cut)]]
        start = time.perf_counter()
        for batch in texts:
            tokenizer(batch, add_special_tokens=False, split_special_tokens=True)
        return {"rows": len(rows), "seconds": time.perf_counter() - start}
    from dpo_lightning import PreferenceDataModule

    kwargs = {} if num_proc is None else {"dataset_num_proc": num_proc}
    figures = {}
    for run in ("seconds", "cached_seconds"):
        dm = PreferenceDataModule(dataset=data, dataset_format="hh", tokenizer=tokenizer, max_length=512,
                                  max_prompt_length=128, **kwargs)
        start = time.perf_counter()
        dm.setup("fit")
        figures[run] = time.perf_counter() - start
    return {"rows": dm.summary["train"]["rows"], **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT))
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=None, help="dataset_num_proc (default: the module's)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "TOKENIZER_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.data, args.child[1], args.num_proc)))
        return

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    with gzip.open(args.data, "rt") as f:
        slice_rows = [json.loads(line) for line in f]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([t for row in slice_rows for t in row.values()], vocab_size=8000,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    work = Path(tempfile.mkdtemp())
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>").save_pretrained(work / "tok")
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps(slice_rows[i % len(slice_rows)]) + "\n" for i in range(args.rows)))

    results = {"ours": [], "encode": []}
    for _ in range(args.rounds):
        for variant in results:  # alternate, so load from other processes hits both alike
            env = {**os.environ, "HF_DATASETS_CACHE": tempfile.mkdtemp(dir=work)}
            command = [sys.executable, __file__, "--data", str(data), "--child", variant, str(work / "tok")]
            if args.num_proc is not None:
                command += ["--num-proc", str(args.num_proc)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    import torch

    rows = results["ours"][0]["rows"]
    rate = {v: rows / statistics.median(r["seconds"] for r in runs) for v, runs in results.items()}
    cached = rows / statistics.median(r["cached_seconds"] for r in results["ours"])
    print(f"{rows} HH rows, {os.cpu_count()} CPU cores, torch {torch.__version__}, byte-level BPE vocab 8,000, "
          f"max_length 512 / 128, medians of {args.rounds} alternating rounds")
    print(f"| variant | rows/s |\n|---|---|\n| ours, cold | {rate['ours']:,.0f} |\n"
          f"| tokenizer batched encode of the 3 texts | {rate['encode']:,.0f} |\n| ours, from the cache | {cached:,.0f} |")
    print(f"encode / ours (cold): {rate['encode'] / rate['ours']:.2f}x")


if __name__ == "__main__":
    main()
