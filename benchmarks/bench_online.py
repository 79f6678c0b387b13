"""Online DPO against TRL's OnlineDPOTrainer (issue 30): seconds per step, the share of a step spent generating, and
the greedy solve rate reached, on the online quickstart's task (configs/online_quickstart.yaml).

The workload, the same through both: sort-tiny (dpo_lightning/assets/sort-tiny, float32, CPU), the 2000 prompts of
its train split, the reward `dpo_lightning.online.rewards.sort_closeness`, 32 prompts a step, 2 completions per
prompt (TRL's online DPO samples exactly 2; the quickstart samples 4), max_new_tokens 10, temperature 1.0, top_k 0,
top_p 1.0, sigmoid loss with beta 0.1, AdamW at 3e-4 without weight decay, 10 warm-up steps then constant (our
`lr_factor` handed to TRL as its scheduler: Hugging Face's `constant_with_warmup` would train its first step at
rate 0), no gradient clipping (the quickstart clips nothing; TRL's default would clip at 1.0), no gradient
checkpointing (TRL's default is on, which also turns its KV cache off in generation), no gradient accumulation,
no vLLM, seed 42, the reference the starting weights.
- ours: `DPOModule(online=OnlineConfig(...))` + `PreferenceDataModule` under a Lightning `Trainer`.
- trl: `trl.experimental.online_dpo.OnlineDPOTrainer` with `reward_funcs=[closeness]`, `closeness` being
  `sort_closeness` under TRL's calling convention (keyword arguments, extra ones ignored).
What differs by design and stays: a prompt whose 2 completions score the same is skipped by ours (no pair) and
trained by TRL (its first completion as chosen), and TRL's loss is the mean over all prompts where ours is the mean
over the pairs; each shuffles the prompts with its own sampler, and samples with its own random streams.

The columns, per side:
- s/step: wall seconds of a whole iteration of the training loop, from one optimizer step's start to the next's
  (the last: to the end of training), so that everything a step costs counts alike on both sides: the batch, the
  step, the logging, the callbacks (ours: a callback's `on_train_batch_start`, then `on_train_end`; TRL:
  `on_step_begin`, then `on_train_end`); median over the timed steps (the first `--warmup` of each run are not
  counted) of every round; "per round" gives each run's.
- Both log every `--log-every` steps (10 by default: TRL's `logging_steps` default and the quickstarts'
  `log_every_n_steps`; 1 for a log at every step).
- generate share: the share of the wall time spent sampling, scoring and pairing. Ours: the package's own
  `train/time/generate_share` from metrics.csv (`online/sampler.py`: `Online.pairs`, whole; one value per log,
  over the steps since the previous one; the first log's is not counted). TRL: per step, the time in its
  `_generate` (prompt tokenizing, `model.generate`, the cut at EOS) and `_calculate_rewards_from_functions`; its
  decode and pair indexing (inline in `training_step`, microseconds) are not counted.
- solve rate: `sort_exact` of greedy completions (max_new_tokens 10) of the 256 sort-tiny validation prompts,
  by `solve_rate` below for both sides' models in memory, before training (start) and after it (end).
Each (side, round) runs in a fresh subprocess; the sides alternate: ours, trl, ours, trl, ...

    python benchmarks/bench_online.py                  # 100 steps (the quickstart's), 5 warm-up, 3 rounds
    python benchmarks/bench_online.py --quick          # smoke test: 3 steps, 1 round
"""

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

# torch, transformers, Lightning and TRL are imported in the functions that use them: the parent process only starts
# the runs and prints the table, and each run's process imports what its side needs.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "dpo_lightning", "assets", "sort-tiny")
TRAIN, VAL = os.path.join(MODEL, "train.jsonl"), os.path.join(MODEL, "val.jsonl")
SIDES = ("ours", "trl")
# The online quickstart's settings (configs/online_quickstart.yaml), but 2 samples per prompt: TRL's only choice.
SEED, BETA, LEARNING_RATE, WARMUP_LR_STEPS = 42, 0.1, 3.0e-4, 10
BATCH_PROMPTS, NUM_SAMPLES, MAX_NEW_TOKENS, TEMPERATURE = 32, 2, 10, 1.0
MAX_LENGTH, MAX_PROMPT_LENGTH = 32, 16
# No network: TRL's trainer pings the hub's telemetry when it starts.
QUIET_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
             "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each run left out of the medians")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--log-every", type=int, default=10, help="steps between logs, both sides")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 steps (1 warm-up), 1 round")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # internal: one run, prints its result
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rounds, args.log_every = 3, 1, 1, 1
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be >= 0 and below --steps; got {args.warmup} and {args.steps}")
    return args


def read_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def closeness(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """`sort_closeness` as TRL calls a reward: by keyword, with `completion_ids`, `trainer_state` and the
    dataset's other columns besides, which it does not read."""
    from dpo_lightning.online.rewards import sort_closeness

    return sort_closeness(prompts, completions)


def solve_rate(model, tokenizer, prompts: list[str]) -> float:
    """The share of `prompts` whose greedy completion is exactly sorted (`sort_exact`): one left-padded batch through
    plain `generate`, with a fresh greedy config (not the model's, which a trainer may have changed), the prompt
    tokens as both trainers make them (no special tokens added), the completion decoded without its EOS and pads."""
    import torch
    from transformers import GenerationConfig

    from dpo_lightning.online.rewards import sort_exact

    eos = tokenizer.eos_token_id
    inputs = tokenizer(prompts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    config = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, pad_token_id=eos)
    training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs.to(model.device), generation_config=config)
    model.train(training)
    completions = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return statistics.fmean(sort_exact(prompts, completions))


def sort_tiny_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # sort-tiny has none; both trainers do this
    return tokenizer


# ---------------------------------------------------------------- one run of one side, in its own process


def run_ours(args, out_dir: str, val_prompts: list[str]) -> dict:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from dpo_lightning import DPOModule, OnlineConfig, PreferenceDataModule

    class StepTimer(L.Callback):
        def __init__(self):
            self.starts = []  # each step's start, then the end of training

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, module):
            self.starts.append(time.perf_counter())

    L.seed_everything(SEED, verbose=False)
    online = OnlineConfig(reward_funcs="dpo_lightning.online.rewards.sort_closeness", num_samples=NUM_SAMPLES,
                          max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE)
    module = DPOModule(MODEL, beta=BETA, learning_rate=LEARNING_RATE, warmup_steps=WARMUP_LR_STEPS, online=online)
    data = PreferenceDataModule(dataset=TRAIN, tokenizer=MODEL, max_length=MAX_LENGTH,
                                max_prompt_length=MAX_PROMPT_LENGTH, batch_size=BATCH_PROMPTS, seed=SEED)
    tokenizer, timer = sort_tiny_tokenizer(), StepTimer()
    start_rate = solve_rate(module.policy, tokenizer, val_prompts)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.steps,
                        logger=CSVLogger(out_dir, name="ours"), log_every_n_steps=args.log_every,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(module, datamodule=data)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        shares = [float(row["train/time/generate_share"]) for row in csv.DictReader(f)
                  if row.get("train/time/generate_share")]
    if len(shares) != args.steps // args.log_every:
        raise RuntimeError(f"metrics.csv holds {len(shares)} generate shares for {args.steps} steps logged every "
                           f"{args.log_every}")
    return {"times": [b - a for a, b in zip(timer.starts, timer.starts[1:])], "shares": shares[1:] or shares, "start_rate": start_rate,
            "end_rate": solve_rate(module.policy, tokenizer, val_prompts), "model": model_shape(module.policy)}


def run_trl(args, out_dir: str, val_prompts: list[str]) -> dict:
    import functools

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from dpo_lightning.training.optim import lr_factor

    steps = []  # per optimizer step: [wall seconds, seconds generating]

    class TimedOnlineDPOTrainer(OnlineDPOTrainer):
        def _generate(self, *a, **kw):
            return timed(super()._generate, *a, **kw)

        def _calculate_rewards_from_functions(self, *a, **kw):
            return timed(super()._calculate_rewards_from_functions, *a, **kw)

    def timed(call, *a, **kw):
        start = time.perf_counter()
        try:
            return call(*a, **kw)
        finally:
            steps[-1][1] += time.perf_counter() - start

    starts = []  # each step's start, then the end of training

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            starts.append(time.perf_counter())
            steps.append([0.0, 0.0])

        def on_train_end(self, *a, **kw):
            starts.append(time.perf_counter())

    config = OnlineDPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, gradient_checkpointing=False, max_grad_norm=0.0, seed=SEED,
        per_device_train_batch_size=BATCH_PROMPTS, gradient_accumulation_steps=1, max_steps=args.steps,
        learning_rate=LEARNING_RATE, beta=BETA, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
        max_length=MAX_LENGTH, logging_steps=args.log_every, report_to="none", save_strategy="no", disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    # As ours: AdamW without weight decay (torch's default is 0.01), our warm-up-then-constant factor per step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warmup_steps=WARMUP_LR_STEPS, total_steps=0, kind="constant"))
    tokenizer = sort_tiny_tokenizer()
    start_rate = solve_rate(model, tokenizer, val_prompts)
    trainer = TimedOnlineDPOTrainer(
        model=model, reward_funcs=[closeness], args=config, processing_class=tokenizer, callbacks=[Timer()],
        train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in read_prompts(TRAIN)]),
        optimizers=(optimizer, schedule))
    trainer.train()
    walls = [b - a for a, b in zip(starts, starts[1:])]
    return {"times": walls, "shares": [generating / wall for wall, (_, generating) in zip(walls, steps)],
            "start_rate": start_rate, "end_rate": solve_rate(trainer.model, tokenizer, val_prompts),
            "model": model_shape(trainer.model)}


def model_shape(model) -> str:
    c = model.config
    return (f"{c.architectures[0]}, hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} "
            f"heads, vocabulary {c.vocab_size}, {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{next(model.parameters()).dtype}")


def run_worker(args) -> dict:
    import torch

    runner = {"ours": run_ours, "trl": run_trl}[args.worker]
    with tempfile.TemporaryDirectory(prefix=f"bench_online_{args.worker}_") as out_dir:
        result = runner(args, out_dir, read_prompts(VAL))
    if len(result["times"]) != args.steps:
        raise RuntimeError(f"{args.worker}: {len(result['times'])} steps timed, {args.steps} run")
    return {**result, "side": args.worker, "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- the driver and the table


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        os.environ.update(QUIET_ENV)
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return
    load_before = os.getloadavg()
    results = {side: [] for side in SIDES}
    for round_index in range(args.rounds):
        for side in SIDES:
            print(f"[bench] round {round_index + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
            results[side].append(run_in_subprocess(side, args))
    print(report(args, results, load_before, os.getloadavg()))


def run_in_subprocess(side: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", side, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--log-every", str(args.log_every)]
    env = {**os.environ, **QUIET_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def machine() -> str:
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores visible; {platform.system()} {platform.release()}; " \
           f"python {platform.python_version()}"


def report(args, results: dict[str, list[dict]], load_before: tuple, load_after: tuple) -> str:
    first = results["ours"][0]
    load = lambda loads: " / ".join(f"{x:.2f}" for x in loads)  # noqa: E731
    lines = [f"machine: {machine()}",
             f"load average (1/5/15 min): {load(load_before)} before, {load(load_after)} after",
             f"versions: torch {version('torch')}, transformers {version('transformers')}, "
             f"lightning {version('lightning')}, trl {version('trl')}; torch threads {first['threads']}",
             f"model: sort-tiny, {first['model']}",
             f"workload: {BATCH_PROMPTS} prompts/step x {NUM_SAMPLES} samples, max_new_tokens {MAX_NEW_TOKENS}, "
             f"temperature {TEMPERATURE}, reward sort_closeness, lr {LEARNING_RATE:g} ({WARMUP_LR_STEPS} warm-up "
             f"steps), beta {BETA}; solve rate: sort_exact, greedy, {len(read_prompts(VAL))} validation prompts",
             f"steps: {args.steps} per run ({args.warmup} warm-up, not in the medians), {args.rounds} round(s), "
             f"sides alternating, each run in a fresh process; both log every {args.log_every} step(s)",
             "",
             "| side | s/step (median) | per round | generate share (median) | solve rate start | "
             "solve rate end (median) | per round |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for side, runs in results.items():
        times = [t for run in runs for t in run["times"][args.warmup:]]
        shares = [s for run in runs for s in run["shares"][args.warmup if side == "trl" else 0:]]  # ours: per log
        summary[side] = {"step": statistics.median(times), "share": statistics.median(shares),
                         "end": statistics.median(run["end_rate"] for run in runs)}
        per_round_times = " / ".join(f"{statistics.median(run['times'][args.warmup:]):.3f}" for run in runs)
        per_round_rates = " / ".join(f"{run['end_rate']:.3f}" for run in runs)
        starts = sorted({f"{run['start_rate']:.3f}" for run in runs})
        lines.append(f"| {side} | {summary[side]['step']:.3f} | {per_round_times} | {summary[side]['share']:.2f} | "
                     f"{' / '.join(starts)} | {summary[side]['end']:.3f} | {per_round_rates} |")
    ours, trl = summary["ours"], summary["trl"]
    lines.append(f"| ours / trl | {ours['step'] / trl['step']:.2f}x | | {ours['share'] / trl['share']:.2f}x | | "
                 f"{ours['end'] - trl['end']:+.3f} (difference) | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
