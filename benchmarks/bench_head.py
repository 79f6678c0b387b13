"""The output head alone: the lean path's chunked head against the bare head GEMM, on the same positions.

Both take the same hidden states (N, D) of N response positions, an output head nn.Linear(D, V, bias=False)
and N target tokens, and run forward and backward to the hidden states and the head's weight:
- bare: `log_softmax(hidden @ W^T).gather(targets)`, autograd through it (what the DPO reference does on the
  full logits, here on the response positions only): three matmuls (logits, grad of hidden, grad of W) and
  (N, V) logits, log-softmax and gradient buffers.
- ours: `logps.head_logps`, the lean path's head: `chunk_size` positions at a time, nothing of size (N, V)
  kept, logits recomputed in backward (four matmuls for bare's three: its floor is about 1.33x bare).
The loss is a weighted sum of the N log-probs (weights of both signs, as a DPO loss gives). Runs alternate
A B A B ... in one process; the table shows medians, each round's median and ours / bare. Peak memory is
measured separately, each variant once in a fresh process: the growth of the process's peak RSS (VmHWM,
reset just before) during one forward + backward, above the inputs and a warm-up call at 8 positions, with glibc's mmap
threshold fixed at 64 KB so every large buffer is mapped and unmapped on its own (RSS follows live memory).
It counts every buffer of the call, the head's weight gradient (V x D float32) included.

    python benchmarks/bench_head.py                      # 2,600 positions, hidden 256, vocabulary 32,000
    python benchmarks/bench_head.py --tokens 1024 --vocab 151936 --hidden 896 --reps 5
    python benchmarks/bench_head.py --quick              # smoke test (a second)
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo_lightning.training.logps import LogitTransform, head_logps

VARIANTS = ("bare", "ours")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2600, help="response positions N")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size D")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary V")
    parser.add_argument("--chunk-size", type=int, default=256, help="ours: positions per head call "
                        "(DPOModule's logps_chunk_size)")
    parser.add_argument("--reps", type=int, default=10, help="timed runs of each variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each variant first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 runs each: a smoke test")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # the memory subprocess
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.chunk_size, args.reps, args.rounds, args.warmup = (
            300, 32, 1000, 64, 2, 1, 1)
    return args


def make_inputs(args, n_tokens: int) -> tuple[nn.Linear, Tensor, Tensor, Tensor]:
    """The head, hidden states (N, D) that require grad, targets (N,) and the loss weights (N,), from seed 0."""
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    head = nn.Linear(args.hidden, args.vocab, bias=False).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(args.vocab, args.hidden, generator=generator) / args.hidden ** 0.5)
    hidden = torch.randn(n_tokens, args.hidden, generator=generator).to(dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (n_tokens,), generator=generator)
    weights = torch.randn(n_tokens, generator=generator)
    return head, hidden, targets, weights


def run(variant: str, args, head: nn.Linear, hidden: Tensor, targets: Tensor, weights: Tensor) -> None:
    """One forward and backward of `variant`; the gradients land in hidden.grad and head.weight.grad."""
    hidden.grad = head.weight.grad = None
    if variant == "bare":
        logits = hidden @ head.weight.T  # (N, V)
        token_logps = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        token_logps, _ = head_logps(head, LogitTransform(), hidden, targets, args.chunk_size)
    (token_logps * weights).sum().backward()


def time_variants(args) -> dict[str, list[list[float]]]:
    """Seconds per forward + backward, per variant and round, the variants alternating run by run."""
    inputs = make_inputs(args, args.tokens)
    for _ in range(args.warmup):
        for variant in VARIANTS:
            run(variant, args, *inputs)
    times = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            times[variant].append([])
        for _ in range(args.reps):
            for variant in VARIANTS:
                start = time.perf_counter()
                run(variant, args, *inputs)
                times[variant][-1].append(time.perf_counter() - start)
    return times


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, from /proc (Linux), in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def memory_of(variant: str, args) -> None:
    """In a fresh process: print the peak RSS growth (MB) of one forward + backward of `variant`."""
    run(variant, args, *make_inputs(args, 8))  # load the kernels' libraries and their buffers
    inputs = make_inputs(args, args.tokens)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = rss_mb("VmRSS")
    run(variant, args, *inputs)
    print(f"{rss_mb('VmHWM') - before:.1f}")


def measure_memory(variant: str, args, argv: list[str]) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # fixed: big buffers are mmapped, freed at once
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--memory-of", variant],
                          capture_output=True, text=True, env=env, check=True)
    return float(done.stdout.split()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_of(args.memory_of, args)
    times = time_variants(args)
    memory = {} if args.no_memory else {variant: measure_memory(variant, args, argv) for variant in VARIANTS}
    print(f"machine: {platform.machine()} {platform.processor() or 'CPU'}, {os.cpu_count()} cores visible, "
          f"{args.threads} threads; python {platform.python_version()}, torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"shapes: N {args.tokens} positions, hidden {args.hidden}, vocabulary {args.vocab}, {args.dtype}; "
          f"ours: chunks of {args.chunk_size}; {args.rounds} rounds x {args.reps} runs each, alternating, "
          f"after {args.warmup} warm-up runs")
    bare = statistics.median(t for round_ in times["bare"] for t in round_)
    print("\n| head | ms (median) | per round | vs bare | peak RSS growth MB |\n|---|---|---|---|---|")
    for variant in VARIANTS:
        median = statistics.median(t for round_ in times[variant] for t in round_)
        rounds = " / ".join(f"{statistics.median(round_) * 1e3:.1f}" for round_ in times[variant])
        peak = f"{memory[variant]:.0f}" if memory else "-"
        print(f"| {variant} | {median * 1e3:.1f} | {rounds} | {median / bare:.2f}x | {peak} |")


if __name__ == "__main__":
    main()
