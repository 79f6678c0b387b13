"""DPO step time and peak memory: dpo_lightning's modes against a bare PyTorch loop and TRL's DPOTrainer.

The workload (issue 6): a Llama-shaped model built from a config (hidden 256, 4 layers, vocabulary 32,000)
or a GPT-2-shaped one (same sizes, head tied to the embedding); 8 pairs a batch (16 sequences),
max_length 512, max_prompt_length 128. `--preset qwen-vocab` (issue 15) is where the logits dominate: a
Qwen2.5-0.5B-shaped model (vocabulary 151,936, hidden 896, tied head) cut to 4 layers, 4 pairs a batch,
max_length 1024, bare and TRL against lean and packed; the Anthropic HH slice in ../shared/data/hh-rlhf/ tokenized with a
byte-level BPE tokenizer (vocabulary 32,000) trained on it here, or, without the slice, the quickstart's
sorting data and tokenizer. Everything is cached in $DPO_BENCH_CACHE (default: <tmp>/dpo_lightning_bench).

Every mode runs the same batches in the same order, from the same starting weights, in float32:
- bare: a minimal hand-written loop (the DPO reference's log_softmax + gather, AdamW), no framework.
- default: DPOModule() and PreferenceDataModule() with no flags: lean log-probs on the layout the data module's
  `prefix_sharing: auto` picks for the model (layouts.py; printed to stderr): packed prefix sharing when the
  model passes the shared-layout probe, the padded layout otherwise.
- naive: DPOModule(lean_logps=False) under a Lightning Trainer on padded batches: full (2B, T, V) logits.
- lean: DPOModule() on padded batches (the default before issue 20): the output head on response tokens
  only, in chunks. The modes below run on padded batches too, unless they say otherwise.
- lora: lean + a rank-16 LoRA adapter (peft's default targets); the reference is the adapter disabled.
- gradient_checkpointing: lean + activation checkpointing.
- precompute: lean + `precompute_ref_log_probs=True`: the reference's log-probs of every batch are scored
  before the first step (not timed; cached in a fresh folder each run) and training holds the policy alone.
- shared: lean on shared-prefix batches (`PreferenceDataModule(prefix_sharing=True)`, packing.py): one row
  `[prompt | chosen | rejected]` per pair, so each prompt runs once.
- packed: shared + `packing=True`: several pairs per row, up to max_length tokens a row (what `default` picks
  for the Llama- and GPT-2-shaped models).
- packed_precompute: packed + precompute, everything that makes a step cheaper at once.
- compile (only when asked, `--modes ... compile`): lean + `torch_compile=True`; its compilation falls in the
  warm-up steps (the "first step" column) and, at a new shape, in a timed one.
- trl: TRL's DPOTrainer with its defaults (gradient checkpointing on; bf16 off so all modes are float32),
  handed our tokenized rows (`_prepare_dataset` overridden) and kept in order, so its batches are ours.
Each (mode, round) runs in a fresh subprocess, so peak RSS is that mode's; modes alternate A B C A B C.
A step is timed from batch start to the end of the optimizer step; the first `--warmup` are not counted.

    python benchmarks/bench_dpo.py --modes lean default --compare bare trl   # the default before and after
    python benchmarks/bench_dpo.py --compare bare trl                 # Llama-shaped
    python benchmarks/bench_dpo.py --model gpt2 --compare bare trl
    python benchmarks/bench_dpo.py --modes lean shared packed --rounds 3   # prefix sharing and packing
    python benchmarks/bench_dpo.py --preset qwen-vocab --steps 3 --warmup 1   # Qwen's 151,936 vocabulary
    python benchmarks/bench_dpo.py --quick                            # smoke test, in one process
"""

import argparse
import copy
import gzip
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import lightning as L
import peft
import torch
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PretrainedConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.utils.tokenizers import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf", "harmless-base-test-1500.jsonl.gz")
QUICKSTART = os.path.join(ROOT, "dpo_lightning", "assets", "sort-tiny")
MODES = ("default", "naive", "lean", "lora", "gradient_checkpointing", "precompute", "shared", "packed",
         "packed_precompute",
         "compile")
DEFAULT_MODES = MODES[:-1]  # compile spends minutes compiling in each process: ask for it
# The data module's batch layout of the modes that do not take the padded batches.
LAYOUTS = {"shared": {"prefix_sharing": True, "packing": False}, "packed": {"prefix_sharing": True, "packing": True}}
EOS = "<|endoftext|>"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["llama", "gpt2", "qwen"], default="llama")
    parser.add_argument("--preset", choices=["qwen-vocab"], help="qwen-vocab: Qwen2.5-0.5B's shape and vocabulary, "
                        "4 layers, 4 pairs, max_length 1024, bare and TRL vs lean and packed")
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    parser.add_argument("--compare", nargs="*", default=[], choices=["bare", "trl"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=2, help="times each mode runs, alternating")
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--data", default=HH, help="HH-format .jsonl(.gz); the quickstart data if missing")
    parser.add_argument("--quick", action="store_true", help="small model, 2 steps, 1 round, one process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one mode, print its result
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.preset == "qwen-vocab":
        args.model, args.batch_pairs, args.max_length = "qwen", 4, 1024
        args.compare = args.compare or ["bare", "trl"]
        args.modes = args.modes if args.modes != list(DEFAULT_MODES) else ["lean", "packed"]
    if args.quick:
        args.steps, args.warmup, args.rounds, args.batch_pairs, args.max_length = 2, 1, 1, 2, 128
        args.compare = args.compare or ["bare"]
    return args


# ---------------------------------------------------------------- the workload, built once and cached


def prepare_workload(args) -> dict:
    """Tokenizer, model folder and batches on disk; returns their paths and a description."""
    cache = os.environ.get("DPO_BENCH_CACHE", os.path.join(tempfile.gettempdir(), "dpo_lightning_bench"))
    os.makedirs(cache, exist_ok=True)
    use_hh = os.path.exists(args.data) and not args.quick
    tokenizer_dir = train_tokenizer(args.data, os.path.join(cache, "tokenizer-hh-32000")) if use_hh else QUICKSTART
    n_batches = args.warmup + args.steps
    size = (64, 2, 1024) if args.quick else (896, 4, 151936) if args.model == "qwen" else (256, 4, 32000)
    model_name = f"{args.model}-{'-'.join(map(str, size))}-{'hh' if use_hh else 'sort'}"
    model_dir = build_model(args.model, size, tokenizer_dir, os.path.join(cache, model_name))
    batches_path = os.path.join(cache, f"batches-{'hh' if use_hh else 'sort'}-b{args.batch_pairs}-l{args.max_length}"
                                       f"-n{n_batches}-v3.pt")  # v3: batches name their layout
    if not os.path.exists(batches_path):
        rows = tokenized_rows(args.data if use_hh else os.path.join(QUICKSTART, "train.jsonl"), tokenizer_dir,
                              args.max_length, n_batches * args.batch_pairs)
        save_batches(rows, tokenizer_dir, args.batch_pairs, args.max_length, batches_path)
    return {"model_dir": model_dir, "tokenizer_dir": tokenizer_dir, "batches": batches_path,
            "data": os.path.abspath(args.data) if use_hh else "quickstart sorting data", "warmup": args.warmup,
            "max_length": args.max_length}


def train_tokenizer(data: str, path: str) -> str:
    """A byte-level BPE tokenizer with a 32,000 vocabulary, trained on the slice's dialogues (as GPT-2's)."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with gzip.open(data, "rt") if data.endswith(".gz") else open(data) as f:
        rows = [json.loads(line) for line in f]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((row[side] for row in rows for side in ("chosen", "rejected")), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS).save_pretrained(path)
    return path


def build_model(kind: str, size: tuple[int, int, int], tokenizer_dir: str, path: str) -> str:
    """Random weights (seed 0) from a config of `size` = (hidden, layers, vocabulary), saved once so that every
    mode and TRL's reference load the same."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hidden, layers, vocab = size
    vocab = max(vocab, len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(kind, hidden, layers, vocab, tokenizer.eos_token_id))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def model_config(kind: str, hidden: int, layers: int, vocab: int, eos_id: int) -> PretrainedConfig:
    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id}
    if kind == "llama":
        # intermediate 688 = 8/3 x hidden rounded to 16, Llama's ratio; the head is untied, as in Llama.
        return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=1024, tie_word_embeddings=False, **ids)
    if kind == "qwen":
        # Qwen2.5-0.5B at hidden 896: intermediate 4864, 14 heads of 64, 2 key-value heads, head tied to the
        # embedding, rope theta 1e6 (its config.json); smaller widths keep the ratios.
        heads = max(hidden // 64, 4)
        return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 38 // 7 // 16 * 16,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                           max_position_embeddings=2048, rope_theta=1e6, rms_norm_eps=1e-6,
                           tie_word_embeddings=True, **ids)
    return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)


def data_settings(max_length: int, batch_pairs: int) -> dict:
    return dict(max_length=max_length, max_prompt_length=min(128, max_length // 2), batch_size=batch_pairs,
                eval_fraction=0.0)


def tokenized_rows(data: str, tokenizer_dir: str, max_length: int, n_rows: int) -> list[dict]:
    """The first n_rows usable rows, in file order, tokenized by our data rules (`PreferenceDataModule`)."""
    dm = PreferenceDataModule(dataset=data, tokenizer=tokenizer_dir, **data_settings(max_length, 1))
    dm.setup("fit")
    return [dm.train_data[i] for i in range(n_rows)]


def save_batches(rows: list[dict], tokenizer_dir: str, batch_pairs: int, max_length: int, path: str) -> None:
    """`rows` in groups of batch_pairs, collated as the data module does: padded, and in each of LAYOUTS."""
    groups = [rows[i:i + batch_pairs] for i in range(0, len(rows), batch_pairs)]
    token_rows = [{"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"],
                   "rejected_ids": r["rejected_input_ids"]} for r in rows]
    tokenizer = load_tokenizer(tokenizer_dir)
    collated = {}
    for mode, flags in {"padded": {"prefix_sharing": False}, **LAYOUTS}.items():
        dm = PreferenceDataModule(tokenizer=tokenizer, dataset={}, **data_settings(max_length, batch_pairs), **flags)
        collated[mode] = [dm.collate(group) for group in groups]
    torch.save({"batches": collated.pop("padded"), "layouts": collated, "rows": token_rows}, path)


# ---------------------------------------------------------------- one mode, in its own process


def run_mode(mode: str, workload: dict) -> dict:
    torch.manual_seed(0)
    data = torch.load(workload["batches"], weights_only=False)
    runner = {"bare": run_bare, "trl": run_trl}.get(mode, run_module)
    step_times, losses, tokens, start_rss = runner(mode, workload, data)
    warmup = workload["warmup"]
    result = {"mode": mode, "times": [wall for wall, _ in step_times[warmup:]],
              "cpu_times": [cpu for _, cpu in step_times[warmup:]], "first_step": step_times[0][0], "tokens": tokens[warmup:], "final_loss": losses[-1],
              "start_rss_gb": start_rss, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if torch.cuda.is_available():
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def clock() -> tuple[float, float]:
    """Wall-clock and process CPU seconds, after the GPU (if any) has finished its queued work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


def run_bare(mode: str, workload: dict, data: dict):
    """A minimal DPO loop in plain PyTorch: full logits, log_softmax + gather, sigmoid loss, AdamW."""

    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = AutoModelForCausalLM.from_pretrained(workload["model_dir"]).to(device).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def logps(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        per_token = logits.log_softmax(-1).gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
        return (per_token * (labels != -100)).sum(-1)

    times, losses, tokens, start_rss = [], [], [], current_rss_gb()
    for batch in data["batches"]:
        batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        start = clock()
        chosen, rejected = logps(policy, batch).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = logps(reference, batch).chunk(2)
        loss = -F.logsigmoid(0.1 * ((chosen - rejected) - (ref_chosen - ref_rejected))).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(since(start))
        losses.append(loss.item())
        tokens.append(int(batch["attention_mask"].sum()))
    return times, losses, tokens, start_rss


MODULE_KWARGS = {"default": {}, "naive": {"lean_logps": False}, "lean": {}, "lora": {"lora_r": 16},
                 "gradient_checkpointing": {"gradient_checkpointing": True}, "compile": {"torch_compile": True},
                 "shared": {}, "packed": {}, "precompute": {"precompute_ref_log_probs": True},
                 "packed_precompute": {"precompute_ref_log_probs": True}}


def run_module(mode: str, workload: dict, data: dict):
    # `default` leaves the layout to the data module (None): it collates the rows in the layout it picks.
    batches = None if mode == "default" else data["layouts"].get(mode.removesuffix("_precompute"), data["batches"])
    timer, start_rss = fit_module(workload, data, batches, MODULE_KWARGS[mode])
    tokens = [int(b["attention_mask"].sum()) for b in data["batches"]]  # as padded, so every mode counts the same
    return timer.times, timer.losses, tokens, start_rss


def fit_module(workload: dict, data: dict, batches: list[dict], module_kwargs: dict, trainer_kwargs: dict | None = None,
               model: str | torch.nn.Module | None = None) -> tuple["StepTimer", float]:
    """`DPOModule(model or the workload's model, **module_kwargs)` trained on `batches` by a Lightning Trainer."""
    cache_dir = tempfile.mkdtemp(prefix="dpo_bench_ref_")  # fresh: the scoring runs in every process
    module = DPOModule(workload["model_dir"] if model is None else model, learning_rate=1e-6,
                       ref_logps_cache_dir=cache_dir, **module_kwargs)
    timer = StepTimer()
    steps = len(data["batches"] if batches is None else batches)
    trainer = L.Trainer(**{"max_steps": steps, "logger": False, "log_every_n_steps": 1, "enable_checkpointing": False,
                           "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                           "limit_val_batches": 0, "devices": 1, **(trainer_kwargs or {})}, callbacks=[timer])
    start_rss = current_rss_gb()
    trainer.fit(module, datamodule=FixedBatches(data, batches, workload["tokenizer_dir"],
                                                   workload.get("max_length", 512)))
    return timer, start_rss


class FixedBatches(PreferenceDataModule):
    """The benchmark's batches in file order, as a data module whose rows precomputation can score. With
    `batches` None, the rows are collated, in the same groups, in the layout the data module picks itself."""

    def __init__(self, data: dict, batches: list[dict] | None, tokenizer_dir: str, max_length: int = 512):
        padded = data["batches"]
        super().__init__(dataset={}, tokenizer=tokenizer_dir, **data_settings(max_length, len(padded[0]["row_ids"])))
        self.rows, self.batches = data["rows"], batches
        self.row_ids = torch.cat([batch["row_ids"] for batch in padded]).tolist()

    def setup(self, stage=None):
        import datasets

        self.tokenizer = load_tokenizer(self.tokenizer)
        self.train_data = datasets.Dataset.from_list([
            {"row_id": i, "prompt_input_ids": r["prompt_ids"], "chosen_input_ids": r["chosen_ids"],
             "rejected_input_ids": r["rejected_ids"]} for i, r in zip(self.row_ids, self.rows)])
        if self.batches is None:
            self.layout, reason = self._choose_layout()
            print(f"[bench] default layout: {self.layout.name} ({reason})", file=sys.stderr, flush=True)
            size = self.hparams.batch_size
            rows = list(self.train_data)
            self.batches = [self.collate(rows[i:i + size]) for i in range(0, len(rows), size)]

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


class StepTimer(L.Callback):
    """Batch start to batch end: forward, backward and the optimizer step (automatic optimization); and the
    first step's logged mean log-probs, which every mode computing the same thing must agree on."""

    def __init__(self):
        self.times, self.losses, self.start, self.first_logps = [], [], (0.0, 0.0), {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.start = clock()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.times.append(since(self.start))
        self.losses.append(outputs["loss"].item())
        if not self.first_logps:
            self.first_logps = {side: float(trainer.callback_metrics[f"train/logps/{side}"])
                                for side in ("chosen", "rejected")}


def run_trl(mode: str, workload: dict, data: dict, config_kwargs: dict | None = None, dtype: torch.dtype | None = None,
            first_logps: dict | None = None):
    """TRL's DPOTrainer on our batches: its defaults, float32, unless `config_kwargs` (DPOConfig's) say otherwise;
    `first_logps` receives its first step's logged mean log-probs."""
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times, losses, tokens = [], [], []

    class OurBatches(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already tokenized by our rules: TRL's collator builds the same batches

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            losses.append(float(loss.detach()) if not isinstance(loss, tuple) else float(loss[0].detach()))
            return loss

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.start = clock()

        def on_step_end(self, *args, **kwargs):
            times.append(since(self.start))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if first_logps is not None and not first_logps and "logps/chosen" in (logs or {}):
                first_logps.update(chosen=logs["logps/chosen"], rejected=logs["logps/rejected"])

    batch_pairs = len(data["batches"][0]["input_ids"]) // 2
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(**{"output_dir": output_dir, "per_device_train_batch_size": batch_pairs,
                              "max_steps": len(data["batches"]), "max_length": None, "bf16": False, "report_to": "none",
                              "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1, **(config_kwargs or {})})
        model = AutoModelForCausalLM.from_pretrained(workload["model_dir"], dtype=dtype)
        trainer = OurBatches(model=model, args=config,
                             train_dataset=datasets.Dataset.from_list(data["rows"]),
                             processing_class=AutoTokenizer.from_pretrained(workload["tokenizer_dir"]),
                             callbacks=[Timer()])
        start_rss = current_rss_gb()
        trainer.train()
    return times, losses, tokens, start_rss


# ---------------------------------------------------------------- the driver and the table


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(run_mode(args.worker, json.loads(args.workload))), flush=True)
        return
    workload = prepare_workload(args)
    order = list(args.compare) + list(args.modes)
    results = {mode: [] for mode in order}
    for round_index in range(args.rounds):
        for mode in order:
            print(f"[bench] round {round_index + 1}/{args.rounds}: {mode}", file=sys.stderr, flush=True)
            results[mode].append(run_mode(mode, workload) if args.quick else run_in_subprocess(mode, workload))
    print(report(args, workload, results))


def run_in_subprocess(mode: str, workload: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--workload", json.dumps(workload)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"mode {mode} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(args, workload: dict, results: dict[str, list[dict]]) -> str:

    config = AutoConfig.from_pretrained(workload["model_dir"])
    data = torch.load(workload["batches"], weights_only=False)
    timed = data["batches"][workload["warmup"]:]
    positions = sum(b["input_ids"].numel() for b in timed)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in timed)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores visible"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {L.__version__}, " \
               f"peft {peft.__version__}"
    try:
        import trl
        versions += f", trl {trl.__version__}"
    except ImportError:
        pass
    lines = [f"machine: {platform.machine()} {platform.processor() or ''} {device}; python {platform.python_version()}",
             f"versions: {versions}",
             f"model: {config.architectures[0]}, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
             f"vocab {config.vocab_size}, tied head {config.tie_word_embeddings}",
             f"data: {workload['data']}; {len(timed)} timed batches of {len(timed[0]['input_ids'])} sequences, "
             f"padded length {min(b['input_ids'].shape[1] for b in timed)}-{max(b['input_ids'].shape[1] for b in timed)}, "
             f"{labelled / positions:.0%} of positions are response tokens",
             *layout_lines(data, workload["warmup"], len(timed[0]["input_ids"]) // 2),
             f"steps: {args.warmup} warm-up + {args.steps} timed per mode and round, {args.rounds} rounds, "
             "modes alternating, each in a fresh process" if not args.quick else "quick: one process, RSS not per mode",
             "",
             "| mode | s/step (median) | per round | CPU s/step | tokens/s | peak RSS GB | vs bare (time, RSS) "
             "| vs trl (time, RSS) | vs lean (time, RSS) | first step s | last loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for mode, runs in results.items():
        times = [t for run in runs for t in run["times"]]
        summary[mode] = {"median": statistics.median(times),
                         "cpu": statistics.median(t for run in runs for t in run["cpu_times"]),
                         "tokens_per_s": sum(n for run in runs for n in run["tokens"]) / sum(times),
                         "rss": max(run["peak_rss_gb"] for run in runs),
                         "rounds": [statistics.median(run["times"]) for run in runs], "loss": runs[-1]["final_loss"],
                         "first": statistics.median(run["first_step"] for run in runs)}
    for mode, s in summary.items():
        ratios = []
        for base in ("bare", "trl", "lean"):
            b = summary.get(base)
            ratios.append(f"{s['median'] / b['median']:.2f}x, {s['rss'] / b['rss']:.2f}x" if b else "")
        cuda = f" (CUDA {max(r.get('peak_cuda_gb', 0) for r in results[mode]):.2f})" if torch.cuda.is_available() else ""
        lines.append(f"| {mode} | {s['median']:.3f} | {' / '.join(f'{r:.3f}' for r in s['rounds'])} | {s['cpu']:.2f} | "
                     f"{s['tokens_per_s']:.0f} | {s['rss']:.2f}{cuda} | {' | '.join(ratios)} | {s['first']:.1f} | "
                     f"{s['loss']:.4f} |")
    return "\n".join(lines)


def layout_lines(data: dict, warmup: int, batch_pairs: int) -> list[str]:
    """What prefix sharing saves on the timed batches: prompt tokens, and positions (tokens + padding) per layout."""
    pairs = data["rows"][warmup * batch_pairs:]
    prompts = sum(len(r["prompt_ids"]) for r in pairs)
    total = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in pairs)
    padded = sum(b["input_ids"].numel() for b in data["batches"][warmup:])
    lines = [f"prefix sharing: prompts are {prompts / total:.1%} of the pairs' tokens (sum P / sum (2P + C + R)), "
             "run once instead of twice"]
    for mode, batches in data["layouts"].items():
        timed = batches[warmup:]
        positions = sum(b["input_ids"].numel() for b in timed)
        rows = [len(b["pairs_per_row"]) for b in timed]
        widths = [b["input_ids"].shape[1] for b in timed]
        lines.append(f"{mode} layout: {positions / padded:.1%} of the padded layout's positions ({positions} / "
                     f"{padded}, padding included), {statistics.mean(rows):.1f} rows per batch, "
                     f"{len(pairs) / sum(rows):.2f} pairs per row, row length {min(widths)}-{max(widths)}")
    return lines


if __name__ == "__main__":
    main()
