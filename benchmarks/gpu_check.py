"""The GPU check (issue 15): every GPU path of dpo_lightning, measured, in one command of under 8 minutes.

A Qwen2.5-0.5B-shaped model (vocabulary 151,936, hidden 896, 24 layers, head tied to the embedding) with
random weights (seed 0) from a config, no download, in bf16; 8 pairs a step, max_length 1024; the Anthropic
HH slice (`--data`) tokenized by our rules with bench_dpo's 32k BPE tokenizer, or without it synthetic pairs
with the slice's length profile (`synthetic_rows`). Every row trains on the same batches from the same
weights; `--warmup` steps are not timed; figures are medians over the timed steps.

Rows (`ROWS`): naive vs lean log-probs; padded vs prefix sharing vs packing with sdpa; packing with
flex_attention, trained; a precomputed reference; LoRA; QLoRA (a 4-bit base); bf16-mixed with float32
weights vs bf16 weights; `torch_compile`; TRL's DPOTrainer on the same batches (its defaults, and without
gradient checkpointing). Columns: s/step, tokens/s, peak `torch.cuda.max_memory_allocated`, MFU (`step_flops`
says how it is counted) and the check that the first step's mean log-probs equal the naive padded path's
within bf16 tolerance. Then `resume_check` for FSDP (`FSDPStrategy`, a unit per decoder layer) and FSDP2
(`ModelParallelStrategy`, `DPOModule.configure_model`) on one device: two steps, a checkpoint, a resume that
must reach the same weights, and `ExportPretrained`.

It stops itself before `--budget-s` and lists what it skipped; results go to `--out` as results.md and
results.json. `--smoke` runs every code path on CPU with a tiny model in about a minute (tests/test_gpu_check.py);
rows that cannot run there are reported as skipped, with the reason.

    python benchmarks/gpu_check.py --data ../shared/data/hh-rlhf/harmless-base-test-1500.jsonl.gz --out gpu_results
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke
    bash benchmarks/gpu_check.sh          # on a device machine: installs, runs under a timeout, writes to $OUT
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_dpo as bench  # noqa: E402

from dpo_lightning import DPOModule, ExportPretrained  # noqa: E402
from dpo_lightning.training.distributed import DecoderLayers  # noqa: E402

# Mean and standard deviation of the log token count of each field in the HH slice (1,495 usable pairs,
# bench_dpo's 32k BPE tokenizer, max_length 1024): medians 90 / 27 / 36 tokens.
HH_LOG_LENGTHS = {"prompt": (4.33, 1.00), "chosen": (3.33, 0.86), "rejected": (3.51, 0.93)}
# Dense bf16 tensor-core peaks (NVIDIA's datasheets, SXM parts), matched against the device name in order.
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165}
CPU_BACKWARD = "torch 2.13 has no FlexAttention backward on CPU"
CPU_COMPILE = "torch.compile of the decoders takes about a minute on this CPU, past the smoke's budget " \
              "(the same fit_module path with torch_compile=True; CPU figures in docs/benchmarks.md)"
CPU_FSDP1 = "Lightning's FSDPStrategy refuses accelerator='cpu'"
CPU_QLORA = "bitsandbytes' CPU backend drops backward through 4-bit weights after an eval forward (tests/test_qlora.py)"
# Summed log-probs of ~40 tokens near log(vocab) each: bf16 rounding moves their mean far less than 0.5%.
LOGPS_RTOL = 5e-3


@dataclasses.dataclass
class Row:
    name: str
    what: str
    module: dict = dataclasses.field(default_factory=dict)  # DPOModule arguments
    layout: str = "padded"  # or a bench_dpo.LAYOUTS key
    precision: str = "bf16-true"
    attn: str | None = None  # attn_implementation, when not the model's default (sdpa)
    trl: dict | None = None  # DPOConfig arguments: a TRL row
    comparable: bool = True  # whether the first step must equal naive's (a 4-bit base does not)
    cpu_skip: str | None = None


ROWS = [
    Row("naive", "full (2B, T, V) logits, padded batches, sdpa", {"lean_logps": False}),
    Row("lean", "the default: output head on response tokens only, padded batches"),
    Row("prefix sharing", "lean, one row [prompt | chosen | rejected] per pair", layout="shared"),
    Row("packing", "lean, several pairs per row, sdpa", layout="packed"),
    Row("packing flex_attention", "packing with attn_implementation=flex_attention (BlockMask), trained",
        layout="packed", attn="flex_attention", cpu_skip=CPU_BACKWARD),
    Row("precompute", "lean + precompute_ref_log_probs (scored before step 0, untimed)",
        {"precompute_ref_log_probs": True}),
    Row("lora", "lean + lora_r 16; reference = adapter disabled", {"lora_r": 16}),
    Row("qlora", "lora_r 16 on a 4-bit NF4 base (bitsandbytes); reference = adapter disabled on it",
        {"lora_r": 16, "load_in_4bit": True}, comparable=False, cpu_skip=CPU_QLORA),
    Row("bf16-mixed", "float32 weights, precision bf16-mixed (the other rows: bf16 weights, bf16-true)",
        {"torch_dtype": "float32"}, precision="bf16-mixed"),
    Row("trl", "TRL DPOTrainer, its defaults (gradient checkpointing on), bf16", trl={}),
    Row("trl no checkpointing", "TRL DPOTrainer, gradient_checkpointing false", trl={"gradient_checkpointing": False}),
    Row("torch_compile", "lean + torch_compile (compilation in the warm-up steps)", {"torch_compile": True},
        cpu_skip=CPU_COMPILE),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="HH-format .jsonl(.gz); default: synthetic pairs with HH's length profile")
    parser.add_argument("--out", required=True, help="folder for results.md and results.json")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop before this many seconds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in BF16_PEAK_TFLOPS")
    parser.add_argument("--rows", nargs="+", help="only these rows (names from ROWS, fsdp, fsdp2)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 pairs, 1 + 2 steps: every code path")
    args = parser.parse_args(argv)
    args.batch_pairs, args.max_length, args.size = 8, 1024, (896, args.layers, 151936)
    if args.smoke:
        args.batch_pairs, args.max_length, args.size, args.steps, args.warmup = 2, 128, (64, 2, 1024), 2, 1
    return args


# ---------------------------------------------------------------- the workload


def prepare(args) -> tuple[dict, dict]:
    """bench_dpo's workload (model folder, tokenizer, batches in every layout) for this check's shape and data."""
    cache = Path(os.environ.get("DPO_BENCH_CACHE", Path(tempfile.gettempdir()) / "dpo_lightning_bench"))
    cache.mkdir(parents=True, exist_ok=True)
    source = "hh" if args.data else "synthetic"
    tokenizer_dir = bench.train_tokenizer(args.data, str(cache / "tokenizer-hh-32000")) if args.data else bench.QUICKSTART
    size_name = "-".join(map(str, args.size))
    model_dir = bench.build_model("qwen", args.size, tokenizer_dir, str(cache / f"qwen-{size_name}-{source}"))
    n_rows = (args.warmup + args.steps) * args.batch_pairs
    path = cache / f"gpu-check-{source}-{size_name}-b{args.batch_pairs}-l{args.max_length}-n{n_rows}.pt"
    if not path.exists():
        rows = (bench.tokenized_rows(args.data, tokenizer_dir, args.max_length, n_rows) if args.data else
                synthetic_rows(n_rows, args.size[2], args.max_length))
        bench.save_batches(rows, tokenizer_dir, args.batch_pairs, args.max_length, str(path))
    workload = {"model_dir": model_dir, "tokenizer_dir": tokenizer_dir, "batches": str(path), "warmup": args.warmup,
                "data": os.path.abspath(args.data) if args.data else "synthetic pairs, HH's length profile"}
    return workload, torch.load(path, weights_only=False)


def synthetic_rows(n_rows: int, vocab: int, max_length: int, seed: int = 0) -> list[dict]:
    """Random token ids with HH's log-normal length profile (HH_LOG_LENGTHS), scaled by max_length / 1024;
    a pair longer than max_length is drawn again (HH's would be truncated: a little fewer long pairs here)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < n_rows:
        lengths = {field: max(2, int(math.exp(mu + sd * torch.randn((), generator=generator).item()) *
                                     max_length / 1024)) for field, (mu, sd) in HH_LOG_LENGTHS.items()}
        if lengths["prompt"] + max(lengths["chosen"], lengths["rejected"]) > max_length:
            continue
        rows.append({"row_id": len(rows), **{f"{field}_input_ids": torch.randint(
            3, vocab, (n,), generator=generator).tolist() for field, n in lengths.items()}})
    return rows


# ---------------------------------------------------------------- one row


def run_row(row: Row, args, workload: dict, data: dict) -> dict:
    """Train the row's steps; its timings, peak CUDA memory and first-step mean log-probs."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if row.trl is not None:
        first_logps, config = {}, {"bf16": True, "use_cpu": not torch.cuda.is_available(), **row.trl}
        times, _, _, _ = bench.run_trl(row.name, workload, data, config, torch.bfloat16, first_logps)
    else:
        batches = data["layouts"].get(row.layout, data["batches"])
        kwargs = {"torch_dtype": "bfloat16", **row.module}
        model = None
        if row.attn:
            model = AutoModelForCausalLM.from_pretrained(workload["model_dir"], dtype=torch.bfloat16,
                                                         attn_implementation=row.attn)
        timer, _ = bench.fit_module(workload, data, batches, kwargs, {"precision": row.precision}, model=model)
        times, first_logps = timer.times, timer.first_logps
    timed = [wall for wall, _ in times[args.warmup:]]
    result = {"s_per_step": statistics.median(timed), "first_step_s": times[0][0], "first_logps": first_logps}
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def step_flops(config, batches: list[dict], with_reference: bool) -> list[float]:
    """Model FLOPs of each step: the work of the naive padded computation on the non-padding tokens.

    Per sequence of n tokens: 2 N n for the matmuls (N = the weights of every nn.Linear, the output head
    included, embeddings lookups not) and 2 L d n^2 for causal attention's scores and values (half of 4 L d n^2);
    x 3 for the policy's forward and backward, + 1 for the reference's forward (not for a precomputed
    reference). Lean log-probs, prefix sharing and packing do less work than this, so their MFU is the
    rate of useful work, the way MFU compares implementations (PaLM's definition, arXiv:2204.02311 App. B).
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter, heads, kv = config.intermediate_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    per_layer = hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
    n_params = layers * per_layer + hidden * vocab
    passes = 4 if with_reference else 3
    flops = []
    for batch in batches:
        lengths = batch["attention_mask"].sum(-1).double()  # (2B,)
        flops.append(passes * float(2 * n_params * lengths.sum() + 2 * layers * hidden * (lengths ** 2).sum()))
    return flops


def bf16_peak(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)


def first_step_check(logps: dict, naive: dict | None) -> dict:
    """The first step's mean chosen and rejected log-probs against naive padded's, within LOGPS_RTOL."""
    if not naive or not logps:
        return {"ok": None, "why": "no naive row to compare with"}
    diffs = {side: abs(logps[side] - naive[side]) / abs(naive[side]) for side in ("chosen", "rejected")}
    return {"ok": max(diffs.values()) <= LOGPS_RTOL, "max_rel_diff": max(diffs.values())}


# ---------------------------------------------------------------- FSDP and FSDP2: resume, export


def resume_check(strategy, workload: dict, data: dict, folder: Path, module_kwargs: dict) -> dict:
    """Two steps straight vs one step, a checkpoint and a resumed second step: the same weights; then
    ExportPretrained's folder must load with the resumed weights. float32 weights, bf16-mixed (FSDP's
    mixed precision), learning rate 1e-4 so that the two steps move every weight. Each epoch is the same
    single batch, so the resumed step sees the batch the straight run's second step saw."""
    batch = data["batches"][:1]
    folder.mkdir(parents=True, exist_ok=True)

    def fit(max_steps: int, name: str, ckpt_path: Path | None = None, callbacks=()) -> Path:
        module = DPOModule(workload["model_dir"], learning_rate=1e-4, torch_dtype="float32", **module_kwargs)
        trainer = L.Trainer(max_steps=max_steps, strategy=strategy(), devices=1, precision="bf16-mixed", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks))
        trainer.fit(module, datamodule=bench.FixedBatches(data, batch, workload["tokenizer_dir"]), ckpt_path=ckpt_path)
        trainer.save_checkpoint(folder / f"{name}.ckpt")
        return folder / f"{name}.ckpt"

    straight = fit(2, "straight")
    resumed = fit(2, "resumed", fit(1, "first"), [ExportPretrained(str(folder / "hf_model"))])
    weights = {name: torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
               for name, path in (("straight", straight), ("resumed", resumed))}
    start = AutoModelForCausalLM.from_pretrained(workload["model_dir"]).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(folder / "hf_model").state_dict()
    policy = {k.removeprefix("policy."): v for k, v in weights["resumed"].items()
              if k.startswith("policy.") and k.removeprefix("policy.") in start}
    return {"same_weights_after_resume": all(torch.equal(v, weights["straight"][k]) for k, v in weights["resumed"].items()),
            "max_abs_diff_after_resume": max(float((v.float() - weights["straight"][k].float()).abs().max())
                                             for k, v in weights["resumed"].items()),
            "weights_moved": sum(not torch.equal(v, start[k].to(v.dtype)) for k, v in policy.items()),
            "policy_tensors": len(policy),
            "export_equals_resumed": all(torch.equal(exported[k], v.to(exported[k].dtype))
                                         for k, v in policy.items() if k in exported)}


def fsdp1_strategy():
    from lightning.pytorch.strategies import FSDPStrategy
    return FSDPStrategy(auto_wrap_policy=DecoderLayers(), state_dict_type="full")


def fsdp2_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy
    return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1, save_distributed_checkpoint=False)


# FSDP2 with the lean path needs an untied head (distributed.fully_shard_models); the model's is tied.
SHARDED = {"fsdp": ("FSDPStrategy, auto_wrap_policy DecoderLayers, state_dict_type full", fsdp1_strategy, {},
                    CPU_FSDP1),
           "fsdp2": ("ModelParallelStrategy: fully_shard per decoder layer (DPOModule.configure_model), "
                     "lean_logps false (tied head)", fsdp2_strategy, {"lean_logps": False}, None)}


# ---------------------------------------------------------------- the driver and the report


def main(argv=None) -> dict:
    args = parse_args(argv)
    start, out = time.monotonic(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workload, data = prepare(args)
    on_gpu = torch.cuda.is_available()
    results, longest = [], 0.0
    jobs = [(row.name, row.what, row.cpu_skip, lambda row=row: run_row(row, args, workload, data)) for row in ROWS]
    # Checkpoints in a temporary folder: a 0.5B model's are gigabytes, and $OUT on a device machine takes 16 MB.
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    jobs += [(name, what, cpu_skip, lambda name=name, make=make, kwargs=kwargs: resume_check(
        make, workload, data, scratch / name, kwargs)) for name, (what, make, kwargs, cpu_skip) in SHARDED.items()]
    for name, what, cpu_skip, job in jobs:
        entry = {"name": name, "what": what}
        elapsed = time.monotonic() - start
        if args.rows and name not in args.rows:
            entry.update(status="skipped", reason="not in --rows")
        elif cpu_skip and not on_gpu:
            entry.update(status="skipped", reason=f"no GPU: {cpu_skip}")
        elif elapsed + longest > args.budget_s:
            entry.update(status="skipped", reason=f"budget: {elapsed:.0f} s spent, the longest row took {longest:.0f} s, "
                                                  f"--budget-s {args.budget_s:.0f}")
        else:
            print(f"[gpu_check] {elapsed:.0f} s: {name}", file=sys.stderr, flush=True)
            try:
                entry.update(status="measured", **job())
            except Exception as error:  # a broken path is a finding: record it and go on to the next row
                entry.update(status="failed", reason=f"{type(error).__name__}: {error}"[:2000],
                             traceback=traceback.format_exc()[-4000:])
            longest = max(longest, time.monotonic() - start - elapsed)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
        results.append(entry)
    shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize(args, workload, data, results, time.monotonic() - start)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(markdown(summary))
    print(markdown(summary))
    skipped = [f"{r['name']} ({r['reason']})" for r in results if r["status"] != "measured"]
    print("[gpu_check] not measured: " + ("; ".join(skipped) or "none"), file=sys.stderr)
    return summary


def summarize(args, workload: dict, data: dict, results: list[dict], wall_s: float) -> dict:
    config = AutoConfig.from_pretrained(workload["model_dir"])
    timed = data["batches"][args.warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed) / len(timed)
    peak = bf16_peak(args)
    naive = next((r.get("first_logps") for r in results if r["name"] == "naive" and r["status"] == "measured"), None)
    rows = {row.name: row for row in ROWS}
    for entry in results:
        if entry["status"] != "measured" or "s_per_step" not in entry:
            continue
        row = rows[entry["name"]]
        with_reference = not row.module.get("precompute_ref_log_probs")
        flops = statistics.median(step_flops(config, timed, with_reference))
        entry["tokens_per_s"] = tokens / entry["s_per_step"]
        entry["mfu"] = flops / entry["s_per_step"] / peak if peak else None
        entry["check"] = (first_step_check(entry["first_logps"], naive) if row.comparable else
                          {"ok": None, "why": "not comparable: another base"})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return {"machine": f"{platform.machine()} {device}; python {platform.python_version()}",
            "versions": bench_versions(), "smoke": args.smoke, "wall_s": wall_s, "budget_s": args.budget_s,
            "model": f"{config.architectures[0]}, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
                     f"vocab {config.vocab_size}, tied head {config.tie_word_embeddings}",
            "data": f"{workload['data']}; {args.batch_pairs} pairs a step, max_length {args.max_length}, "
                    f"{args.warmup} warm-up + {args.steps} timed steps, {tokens:.0f} non-padding tokens a step",
            "bf16_peak_tflops": peak / 1e12 if peak else None, "rows": results}


def bench_versions() -> str:
    import peft
    import transformers
    return f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {L.__version__}, " \
           f"peft {peft.__version__}"


def markdown(summary: dict) -> str:
    lines = [f"machine: {summary['machine']}", f"versions: {summary['versions']}", f"model: {summary['model']}",
             f"data: {summary['data']}", f"bf16 peak for MFU: {summary['bf16_peak_tflops']} TFLOPS; "
             f"wall {summary['wall_s']:.0f} s of a {summary['budget_s']:.0f} s budget", "",
             "| row | what | s/step | tokens/s | peak CUDA GB | MFU | first step = naive's (rel. diff) |",
             "|---|---|---|---|---|---|---|"]
    resumes = []
    for r in summary["rows"]:
        if r["status"] != "measured":
            lines.append(f"| {r['name']} | {r['what']} | {r['status']}: {r['reason']} | | | | |")
        elif "s_per_step" in r:
            check = r["check"]
            verdict = ("n/a" if check["ok"] is None else
                       f"{'yes' if check['ok'] else 'NO'} ({check['max_rel_diff']:.1e})")
            memory = f"{r['peak_cuda_gb']:.2f}" if "peak_cuda_gb" in r else "n/a (CPU)"
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            lines.append(f"| {r['name']} | {r['what']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {memory} | "
                         f"{mfu} | {verdict} |")
        else:
            resumes.append(r)
    if resumes:
        lines += ["", "| sharded | what | same weights after resume (max abs diff) | weights moved | export loads, = resumed |",
                  "|---|---|---|---|---|"]
        for r in resumes:
            lines.append(f"| {r['name']} | {r['what']} | {r['same_weights_after_resume']} "
                         f"({r['max_abs_diff_after_resume']:.1e}) | {r['weights_moved']} of {r['policy_tensors']} | "
                         f"{r['export_equals_resumed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
