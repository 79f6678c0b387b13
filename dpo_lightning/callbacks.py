"""Callbacks for what surrounds a DPO run: a validation summary, samples during evaluation, a Hugging Face
export, and a checkpoint when the job is preempted.

They work with any logger and strategy; add them under `trainer.callbacks` in a config, or to
`Trainer(callbacks=[...])`. `GenerateSamples` is the seed tutorial's `generate_during_eval=True` (TRL 0.2x,
removed in TRL 1.0) as a callback: policy and reference answer the same prompts, side by side, in every
active logger. `PreemptionCheckpoint` turns SIGTERM and SLURM's SIGUSR1 into a checkpoint at the next
optimizer step, from which `fit(ckpt_path=...)` resumes exactly.
"""

import csv
import os
import signal
import subprocess
import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from dpo_lightning.rules import adds_bos, encode, with_bos
from dpo_lightning.export import export_pretrained
from dpo_lightning.resume import ends_optimizer_step

# Strategies whose weights are sharded across ranks: generating on rank 0 alone would wait forever
# on the other ranks' shards.
SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class ValidationSummary(L.Callback):
    """Validate once before training, log it as step 0, and print every validation at the end of fit.

    Lightning's sanity check runs validation before the first step but throws its results away; with
    `num_sanity_val_steps=-1` it covers the whole split, and this callback keeps it as the step-0 point
    of the curves (where policy == reference: loss ln 2, accuracy 0.5). Its history (every `val/`
    metric of every validation) is saved in checkpoints, where `dpo-lightning export` reads the last
    validation for the model card.

    Args:
        metrics: validation metrics to print, without the `val/` prefix.
    """

    def __init__(self, metrics: tuple[str, ...] = ("loss", "rewards/accuracies", "rewards/margins",
                                                   "reward/greedy")):
        self.metrics = metrics
        self.history: list[dict[str, float]] = []

    def _record(self, trainer: L.Trainer, step: int) -> None:
        values = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if values:
            self.history.append({"step": step, **values})

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(trainer, 0)
        if self.history and trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in self.history[-1].items() if k != "step"}, step=0)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, trainer.global_step)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history:
            print("\n" + self.table())

    def table(self) -> str:
        """A row per validation: `step` and `metrics`, each column as wide as its name or values (80 columns)."""
        names = [m for m in self.metrics if f"val/{m}" in self.history[-1]]
        columns = [("step", [str(row["step"]) for row in self.history])]
        columns += [(name, [f"{row[f'val/{name}']:.4f}" if f"val/{name}" in row else "" for row in self.history])
                    for name in names]
        widths = [max(len(name), *map(len, cells)) for name, cells in columns]
        lines = ["validation" + "".join(f"  {name:>{w}}" for (name, _), w in zip(columns, widths))]
        for i in range(len(self.history)):
            lines.append(" " * 10 + "".join(f"  {cells[i]:>{w}}" for (_, cells), w in zip(columns, widths)))
        return "\n".join(lines)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


class GenerateSamples(L.Callback):
    """At every validation, complete fixed prompts with the policy and the reference, and log the table.

    Each prompt gets a greedy completion and (with `sample`) a sampled one from each model, with the
    same seed for both models and at every validation, so a column changes only when its model does.
    The table has a row per prompt: `prompt`, `chosen` (when the prompts come from the validation
    data), `policy/greedy`, `reference/greedy`, `policy/sampled`, `reference/sampled`. It goes to each
    active logger: CSVLogger -> `<log_dir>/samples/step_<N>.csv`, TensorBoard -> text `samples`, W&B ->
    table `samples`, MLflow -> artifact `samples/step_<N>.json`; the last tables are kept in `tables`.
    Mean completion lengths in tokens (EOS included) are logged as `samples/length/<model>_<decoding>`.

    The reference is `pl_module.reference`, or the LoRA policy with its adapter disabled when there is
    none; without either (a reference-free run) only the policy answers. Skipped during the sanity check.
    Under DDP only rank 0 generates, and it calls no collective while doing so: the other ranks go on to
    the next collective (a checkpoint barrier, the next step's all-reduce) and wait there for it, so keep
    `num_prompts x max_new_tokens` well inside the process group's timeout (30 minutes by default).
    TODO: FSDP and DeepSpeed shard the weights, so every rank would have to generate in step
    (`generate(synced_gpus=True)`); until that is tested on GPUs the callback skips them with a warning.

    Args:
        prompts: prompt strings, tokenized as training does (data.py rule 2). Default: the prompts of
            the first `num_prompts` validation pairs, as tokenized (and truncated) for validation.
        num_prompts: how many validation prompts to use when `prompts` is not given.
        max_new_tokens: tokens generated per completion at most.
        sample: also generate a sampled completion (temperature, top_p), beside the greedy one.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold; 1.0 samples from the whole distribution.
        seed: seed of prompt i's sampled completions is `seed + i`. The training random state is untouched.
    """

    def __init__(self, prompts: list[str] | None = None, num_prompts: int = 4, max_new_tokens: int = 32,
                 sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0):
        if num_prompts < 1 or max_new_tokens < 1 or temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"GenerateSamples: need num_prompts >= 1, max_new_tokens >= 1, temperature > 0 and "
                             f"0 < top_p <= 1; got {num_prompts}, {max_new_tokens}, {temperature}, {top_p}")
        self.prompts, self.num_prompts, self.max_new_tokens = prompts, num_prompts, max_new_tokens
        self.sample, self.temperature, self.top_p, self.seed = sample, temperature, top_p, seed
        self.tables: dict[int, list[dict[str, str]]] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if isinstance(trainer.strategy, SHARDED):
            rank_zero_warn(f"GenerateSamples is skipped under {type(trainer.strategy).__name__}: sharded weights "
                           "would need every rank to generate", category=UserWarning)
            return
        if not trainer.is_global_zero:
            return
        if not isinstance(getattr(trainer.datamodule, "tokenizer", None), PreTrainedTokenizerBase):
            raise ValueError("GenerateSamples needs the run's tokenizer: fit with a PreferenceDataModule "
                             "(trainer.fit(model, datamodule=...))")
        rows, lengths = self.generate(pl_module, trainer.datamodule.tokenizer, self.prompt_rows(trainer.datamodule))
        for name, value in lengths.items():
            pl_module.log(f"samples/length/{name}", value, rank_zero_only=True)
        first = not self.tables
        self.tables[trainer.global_step] = rows
        places = log_table(trainer.loggers, rows, trainer.global_step)
        if first:  # once a fit: where to read them
            print(f"[dpo_lightning] samples of step {trainer.global_step} (completions of {len(rows)} prompts, one "
                  f"table each validation): {'; '.join(places) or 'GenerateSamples.tables only (no logger)'}")

    def prompt_rows(self, datamodule: L.LightningDataModule) -> list[dict[str, list[int]]]:
        """`prompt_input_ids` (and `chosen_input_ids` from validation data) of each prompt."""
        tokenizer = datamodule.tokenizer
        if self.prompts is not None:
            bos = adds_bos(tokenizer)
            return [{"prompt_input_ids": with_bos(ids, bos)} for ids in encode(tokenizer, self.prompts)]
        if datamodule.val_data is None:
            raise ValueError("GenerateSamples: no validation data to take prompts from; pass prompts=[...]")
        val = datamodule.val_data.select(range(min(self.num_prompts, len(datamodule.val_data))))
        return [{"prompt_input_ids": row["prompt_input_ids"], "chosen_input_ids": row["chosen_input_ids"]}
                for row in val]

    @torch.no_grad()
    def generate(self, pl_module: L.LightningModule, tokenizer: PreTrainedTokenizerBase,
                 prompts: list[dict[str, list[int]]]) -> tuple[list[dict[str, str]], dict[str, float]]:
        """The table (a dict per prompt) and the mean completion length of each column, in tokens."""
        decodings = {"greedy": self._config(tokenizer, do_sample=False)}
        if self.sample:
            decodings["sampled"] = self._config(tokenizer, do_sample=True)
        rows = [{"prompt": tokenizer.decode(p["prompt_input_ids"], skip_special_tokens=True)} for p in prompts]
        for row, p in zip(rows, prompts):
            if "chosen_input_ids" in p:
                row["chosen"] = tokenizer.decode(p["chosen_input_ids"], skip_special_tokens=True)
        lengths = {}
        for decoding, config in decodings.items():  # columns side by side: policy/greedy, reference/greedy, ...
            for model_name, (model, weights) in (("policy", (pl_module.policy, nullcontext())),
                                                 ("reference", reference_model(pl_module))):
                if model is None:
                    continue
                with weights:
                    completions = [self._complete(model, p["prompt_input_ids"], config, i, pl_module.device)
                                   for i, p in enumerate(prompts)]
                for row, ids in zip(rows, completions):
                    row[f"{model_name}/{decoding}"] = tokenizer.decode(ids, skip_special_tokens=True)
                lengths[f"{model_name}_{decoding}"] = sum(map(len, completions)) / len(completions)
        return rows, lengths

    def _complete(self, model: nn.Module, prompt_ids: list[int], config: GenerationConfig, index: int,
                  device: torch.device) -> list[int]:
        """One prompt's completion ids (EOS included when reached); one prompt at a time, so no padding."""
        input_ids = torch.tensor([prompt_ids], device=device)  # (1, T)
        with seeded(self.seed + index, device):
            # synced_gpus=False: generating on one rank must never wait on the others.
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 generation_config=config, synced_gpus=False)  # (1, T + new)
        return out[0, input_ids.shape[1]:].tolist()

    def _config(self, tokenizer: PreTrainedTokenizerBase, do_sample: bool) -> GenerationConfig:
        # A fresh config rather than the model's: its defaults (top_k 50, a sampling temperature) vary by model.
        sampling = {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0} if do_sample else {}
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=do_sample, **sampling,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def reference_model(pl_module: L.LightningModule) -> tuple[nn.Module | None, AbstractContextManager]:
    """The model that computes the reference and the context to run it in; (None, ...) where there is none.

    Asked of the module's `reference.Reference` (`pl_module.ref.weights`), the rule training uses: a held
    reference model, or the LoRA policy with its adapter disabled (or the frozen reference adapter active).
    A fresh context at each call.
    """
    return pl_module.ref.weights(pl_module.policy)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with `torch.manual_seed(seed)`, then restore the random state training had."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def log_table(loggers: list[Logger], rows: list[dict[str, str]], step: int, name: str = "samples") -> list[str]:
    """Log a table (a dict per row) to each logger that can hold one; see `GenerateSamples`. Returns where it went."""
    columns, places = list(rows[0]), []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / name / f"step_{step}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)
            places.append(str(path))
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(name, markdown_table(columns, rows), global_step=step)
            places.append(f"TensorBoard text '{name}' in {logger.log_dir}")
        elif isinstance(logger, WandbLogger):
            logger.log_table(key=name, columns=columns, data=[[row[c] for c in columns] for row in rows], step=step)
            places.append(f"W&B table '{name}'")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_table(logger.run_id, data={c: [row[c] for row in rows] for c in columns},
                                        artifact_file=f"{name}/step_{step}.json")
            places.append(f"MLflow artifact {name}/step_{step}.json of run {logger.run_id}")
    return places


def log_file(loggers: list[Logger], path: Path, step: int) -> None:
    """Keep a file (the exported model card) with each logger's run: a W&B run file and an MLflow artifact,
    both under the name of its folder (`hf_model/README.md`), and TensorBoard text of that name."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.save(str(path), base_path=str(path.parent.parent), policy="now")
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=path.parent.name)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(path.parent.name, path.read_text(), global_step=step)


def markdown_table(columns: list[str], rows: list[dict[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows])


class CheckpointValidation(L.Callback):
    """`validate(ckpt_path=...)` (`dpo-lightning validate --ckpt_path`) at the checkpoint's step.

    Lightning restores only the weights and callback states for a validation, not the loop counters: the
    step-300 checkpoint was validated as step 0 (its metrics.csv row, the `GenerateSamples` table, the
    `ValidationSummary` history), and `ModelCheckpoint` warned that its folder had changed, though a validation
    saves no checkpoint. Here the step counters are the checkpoint's while validating (put back after,
    so that a later `fit` on the same Trainer starts where it would have), and the checkpoint callbacks'
    states are left unrestored. `DPOModule.configure_callbacks` adds it to every run.
    """

    def __init__(self):
        self._counters: tuple[int, dict] | None = None  # the Trainer's own, to put back after validating

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "validate" or "loops" not in checkpoint:
            return
        for callback in trainer.checkpoint_callbacks:
            checkpoint.get("callbacks", {}).pop(callback.state_key, None)
        loop, saved = trainer.fit_loop.epoch_loop, checkpoint["loops"]["fit_loop"]
        steps = loop.automatic_optimization.optim_progress  # what trainer.global_step reads
        self._counters = (loop._batches_that_stepped, steps.state_dict())
        loop._batches_that_stepped = saved["epoch_loop.state_dict"]["_batches_that_stepped"]  # the logged step
        steps.load_state_dict(saved["epoch_loop.automatic_optimization.optim_progress"])

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._counters is not None:
            loop = trainer.fit_loop.epoch_loop
            loop._batches_that_stepped = self._counters[0]
            loop.automatic_optimization.optim_progress.load_state_dict(self._counters[1])
            self._counters = None


class ExportPretrained(L.Callback):
    """At the end of fit, save the policy, tokenizer and a model card as a Hugging Face folder.

    The folder (safetensors, generation config, README.md model card with the base model, data, loss,
    beta, steps and last validation metrics) loads with `AutoModelForCausalLM.from_pretrained` and
    `AutoTokenizer.from_pretrained`; see `export.export_pretrained`. The card also goes to the run's loggers
    (`log_file`: W&B and MLflow keep it as `hf_model/README.md`, TensorBoard as text).

    Args:
        dirpath: where to write. Default: `<trainer.log_dir>/hf_model`.
        merge_lora: for a LoRA policy, merge the adapter into the base weights; False saves the adapter alone.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True):
        self.dirpath, self.merge_lora = dirpath, merge_lora

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "hf_model")
        datamodule = trainer.datamodule
        tokenizer = getattr(datamodule, "tokenizer", None)
        data = None
        if datamodule is not None and hasattr(datamodule, "dataset"):
            data = {**datamodule.hparams, "dataset": datamodule.dataset, "eval_dataset": datamodule.eval_dataset}
        step, metrics = last_validation(trainer)
        # Every rank calls: under FSDP gathering the weights is collective; only rank 0 writes.
        export_pretrained(pl_module, tokenizer if isinstance(tokenizer, PreTrainedTokenizerBase) else None, path,
                          self.merge_lora, metrics, steps=trainer.global_step, validation_step=step, data=data,
                          is_main_process=trainer.is_global_zero)
        if trainer.is_global_zero:
            log_file(trainer.loggers, Path(path) / "README.md", trainer.global_step)
            print(f"[dpo_lightning] saved the policy, tokenizer and model card to {path}")


def last_validation(trainer: L.Trainer) -> tuple[int | None, dict[str, float]]:
    """(step, `val/` metrics) of the run's last validation; the step is known when `ValidationSummary` runs."""
    for callback in trainer.callbacks:
        if isinstance(callback, ValidationSummary) and callback.history:
            row = callback.history[-1]
            return row["step"], {k: v for k, v in row.items() if k != "step"}
    return None, {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1 during training, finish the optimizer step, save a checkpoint and exit.

    A cluster warns a job before killing it: SIGTERM on preemption (SLURM, Kubernetes), SIGUSR1 ahead of
    SLURM's time limit with `sbatch --signal=USR1@90`. The signal can land anywhere in a step, mid-backward
    or between two accumulated micro-batches, so the handler only records it; at the end of the next
    optimizer step the weights, optimizer, scheduler and data position agree. The run then stops once that
    step is wholly done: its metrics logged, and the validation due at it run and logged (Lightning's own
    SIGTERM exit point, reached by setting its flag); the checkpoint, saved there in `on_exception`, goes to
    `<dirpath>/<filename>.ckpt` and holds the step as Lightning's "saved after the last batch" state, so a
    resumed run neither repeats that validation nor logs the step again. `fit(ckpt_path=that)`
    (`--ckpt_path` in the CLI) then trains on exactly the batches an uninterrupted run would have. Under
    DDP, FSDP or DeepSpeed the ranks agree at every step on whether any of them was signalled (one
    all-reduce of a scalar), so they save together, whichever rank the signal reached.

    The run exits through Lightning's `SIGTERMException`, with exit code 128 + the signal number (143,
    138): `on_exception` hooks run, `on_fit_end` hooks (an `ExportPretrained` of a half-trained policy)
    don't, and a script can tell a stopped run from a finished one. A signal at the last step lets the run
    finish: nothing is left to resume. On SLURM's requeue signal (SIGUSR1),
    when the Trainer's `SLURMEnvironment` has `auto_requeue` (Lightning's default on SLURM), rank 0 also
    runs `scontrol requeue` for the job, as Lightning's own handler would.

    How it displaces Lightning's handling, during training only (before, e.g. in the sanity check, and
    after, Lightning's handlers are in place): Lightning's SIGTERM handler stops at the end of the current
    batch, even between accumulated micro-batches, and saves nothing; its SLURM SIGUSR1 handler saves
    `hpc_ckpt_<n>.ckpt` from inside the signal handler, wherever the step happens to be, so the optimizer
    state and the data position may disagree with the weights. Lightning's `_teardown` restores the
    handlers it replaced when fit ends, however it ends.

    Budget the signal's lead time (USR1@90: 90 s) for the rest of a step, a validation if one falls due
    there, and writing the checkpoint.

    Args:
        dirpath: folder of the checkpoint. Default: the Trainer's `default_root_dir` (where Lightning also
            writes `hpc_ckpt_<n>.ckpt`), the same at every restart, unlike a logger's versioned folder.
        filename: the checkpoint's file name, without `.ckpt`. A later preemption overwrites it.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self, dirpath: str | None = None, filename: str = "preempted"):
        self.dirpath, self.filename = dirpath, filename
        self.received = 0  # the first signal number received this fit, 0 for none
        self.stopping = 0  # the signal the ranks agreed to stop on, at the end of the current step
        self._validated = False  # a validation ran at the step it stops at
        self._displaced = {}

    def ckpt_path(self, trainer: L.Trainer) -> str:
        return os.path.join(self.dirpath or trainer.default_root_dir, f"{self.filename}.ckpt")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received = self.stopping = 0
        self._validated = False
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint is inactive: signal handlers can only be set in the main thread")
            return
        # After Lightning's own handlers, which the Trainer installs just before training starts.
        self._displaced = {signum: signal.signal(signum, self._record) for signum in self.SIGNALS}

    def _record(self, signum: int, frame) -> None:
        self.received = self.received or signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not ends_optimizer_step(trainer, batch_idx):
            return  # mid-accumulation: the gradients so far are in no checkpoint
        # Every rank reduces at every step, so all of them stop at the same one.
        self.stopping = int(trainer.strategy.reduce(torch.tensor(self.received, device=trainer.strategy.root_device),
                                                    reduce_op="max"))
        # Lightning's exit point, after this step's logs and its due validation: the end of the loop's iteration.
        self._lightning_stops(trainer, bool(self.stopping))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._lightning_stops(trainer, False)  # Lightning would cut the due validation short at its first batch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validated = bool(self.stopping)
        self._lightning_stops(trainer, bool(self.stopping))

    @staticmethod
    def _lightning_stops(trainer: L.Trainer, value: bool) -> None:
        # The flag Lightning's own SIGTERM handler sets (`trainer.received_sigterm`), which ours displaces.
        trainer._signal_connector.received_sigterm = value

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not (self.stopping and isinstance(exception, SIGTERMException)):
            return
        path = self.ckpt_path(trainer)
        # Lightning's restore takes a checkpoint whose step has a validation due as saved at that validation's
        # end (ModelCheckpoint's save point), before the loop counts the step for the loggers, and counts it
        # then; this one is saved after: it must hold the count from before, or the resumed run's logged steps
        # are one ahead.
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._batches_that_stepped -= self._validated
        try:
            trainer.save_checkpoint(path)
        finally:
            epoch_loop._batches_that_stepped += self._validated
        rank_zero_info(f"[dpo_lightning] {signal.Signals(self.stopping).name}: saved step {trainer.global_step} to "
                       f"{path}; resume with --ckpt_path {path}")
        if trainer.is_global_zero and self._requeues(trainer, self.stopping):
            requeue_slurm_job()
        exception.code = 128 + self.stopping  # the exit status: a stopped run, told from a finished one
        self.stopping = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._displaced.items():
            signal.signal(signum, handler)
        self._displaced = {}

    @staticmethod
    def _requeues(trainer: L.Trainer, signum: int) -> bool:
        # The environment Lightning's signal connector reads; single-device strategies don't expose it.
        environment = trainer._accelerator_connector.cluster_environment
        return (isinstance(environment, SLURMEnvironment) and environment.auto_requeue
                and signum == environment.requeue_signal)


def requeue_slurm_job() -> None:
    """Put this SLURM job (or array task) back in the queue, with the command Lightning's SIGUSR1 handler uses."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    if subprocess.call(["scontrol", "requeue", job_id]) != 0:
        rank_zero_warn(f"`scontrol requeue {job_id}` failed: resubmit the job with --ckpt_path to resume")
    else:
        rank_zero_info(f"[dpo_lightning] requeued SLURM job {job_id}")
