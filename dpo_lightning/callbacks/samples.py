"""`GenerateSamples`: at every validation, the policy and the reference complete the same prompts, side by side,
in every active logger (the seed tutorial's `generate_during_eval=True`, TRL 0.2x, removed in TRL 1.0)."""

from contextlib import AbstractContextManager, nullcontext

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from dpo_lightning.callbacks.loggers import log_table
from dpo_lightning.data.rules import adds_bos, encode, with_bos
from dpo_lightning.utils.generation import complete, generation_config, seeded, sharded, stop_ids, texts


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
        prompts: prompt strings, tokenized as training does (data/rules.py rule 2). Default: the prompts of
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
        refusal = sharded(trainer, "GenerateSamples")
        if refusal:
            rank_zero_warn(f"{refusal}: skipped", category=UserWarning)
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
        stops = stop_ids(pl_module.policy, tokenizer)
        decodings = {"greedy": generation_config(tokenizer, stops, self.max_new_tokens)}
        if self.sample:
            decodings["sampled"] = generation_config(tokenizer, stops, self.max_new_tokens, do_sample=True,
                                                     temperature=self.temperature, top_p=self.top_p)
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
                # The text a reward reads (`texts`: without the stop token), so the table shows what GreedyReward
                # and online DPO score.
                _, answers = texts(tokenizer, [p["prompt_input_ids"] for p in prompts], completions, stops)
                for row, answer in zip(rows, answers):
                    row[f"{model_name}/{decoding}"] = answer
                lengths[f"{model_name}_{decoding}"] = sum(map(len, completions)) / len(completions)
        return rows, lengths

    def _complete(self, model: nn.Module, prompt_ids: list[int], config: GenerationConfig, index: int,
                  device: torch.device) -> list[int]:
        """One prompt's completion ids (its stop token included when reached); one prompt at a time, each with
        its own seed, so that a column changes only when its model does."""
        with seeded(self.seed + index, device):
            return complete(model, [prompt_ids], config, device)[0]


def reference_model(pl_module: L.LightningModule) -> tuple[nn.Module | None, AbstractContextManager]:
    """The model that computes the reference and the context to run it in; (None, ...) where there is none.

    Asked of the module's `reference.Reference` (`pl_module.ref.weights`), the rule training uses: a held
    reference model, or the LoRA policy with its adapter disabled (or the frozen reference adapter active).
    A fresh context at each call.
    """
    return pl_module.ref.weights(pl_module.policy)


