"""A NaN loss never reaches the weights: the run stops naming the step and the rows, or skips the optimizer step.

The policy's log-probs are poisoned for the batch that holds row 5 (the row's batch and step are read
from the run itself), or for the first micro-batch of optimizer step 1. With `skip` and gradient
accumulation 2, the poisoned micro-batch's whole optimizer step is skipped: no weight, no AdamW moment or step count, no learning-rate schedule, no logged metric
and no bco_pair running mean moves, while every other step trains. The same under 2 and 3 DDP ranks is
in test_ddp_matrix.py.
"""

import copy
import math

import lightning as L
import pytest
import torch
from conftest import RecordBatches, ascii_tokenizer, data_module, quiet_trainer, response_logps, rows

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.training.scorer import Scorer
from dpo_lightning.utils.steps import ends_optimizer_step

POISONED_ROW = 5


class PoisonedRow(DPOModule):
    """NaN log-probs for the batch holding `POISONED_ROW`; records the global step of every `train/` log."""

    logged_at: list[int]

    def log(self, name, *args, **kwargs):
        if name.startswith("train/"):
            self.__dict__.setdefault("logged_at", []).append(self.global_step)
        return super().log(name, *args, **kwargs)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scorer = PoisonedScorer(self)  # the policy's log-probs; the reference keeps the scorer it was given

    def poisoned(self, batch) -> bool:
        return POISONED_ROW in batch["row_ids"]


class PoisonedScorer(Scorer):
    """The module's log-prob path, with NaN log-probs for the policy's training pass over a poisoned batch."""

    def __init__(self, module: PoisonedRow):
        super().__init__(module.scorer.lean, module.scorer.chunk_size)
        self.poisoned = module.poisoned

    def __call__(self, model, batch, router=None):
        scores = super().__call__(model, batch, router)
        if torch.is_grad_enabled() and self.poisoned(batch):  # the policy's pass, in training
            scores = scores._replace(logps=scores.logps * float("nan"))
        return scores


class PoisonedStep(PoisonedRow):
    """NaN log-probs in the first of the two micro-batches of optimizer step 1 (on rank 0 only, under DDP),
    so that a step trains after it."""

    def poisoned(self, batch) -> bool:
        return self.global_step == 1 and self.trainer.fit_loop.epoch_loop.batch_idx % 2 == 0 and self.global_rank == 0


class RecordSteps(L.Callback):
    """At the end of each optimizer step: its rows, the weights, the optimizer state and the learning rate."""

    def __init__(self):
        self.steps, self.rows = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rows.extend(batch["row_ids"].tolist())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if ends_optimizer_step(trainer, batch_idx):
            optimizer = trainer.optimizers[0]
            self.steps.append({"rows": self.rows, "lr": optimizer.param_groups[0]["lr"],
                               "weights": {k: v.clone() for k, v in module.policy.state_dict().items()},
                               "optimizer": copy.deepcopy(optimizer.state_dict()["state"])})
            self.rows = []


def fit(nonfinite_loss, tiny_llama, tmp_path, accumulate=1, callbacks=(), **model_kwargs):
    L.seed_everything(0)
    model = (PoisonedStep if accumulate > 1 else PoisonedRow)(tiny_llama, learning_rate=1e-2, nonfinite_loss=nonfinite_loss, **model_kwargs)
    trainer = quiet_trainer(tmp_path, max_steps=-1, max_epochs=1, enable_checkpointing=False,
                            accumulate_grad_batches=accumulate, log_every_n_steps=1, callbacks=list(callbacks))
    # The padded layout: the oracle (`response_logps`) reads one sequence a row.
    return model, trainer, lambda: trainer.fit(model, data_module(12, eval_n=0, batch_size=2 if accumulate > 1 else 4,
                                                                  prefix_sharing=False))


def test_nan_loss_stops_the_run_naming_step_and_rows_before_any_update(tiny_llama, tmp_path):
    record = RecordBatches(weights=True)
    model, trainer, run = fit("stop", tiny_llama, tmp_path, callbacks=[record])
    with pytest.raises(FloatingPointError) as error:
        run()
    step, rows_ = len(record.batches) - 1, record.batches[-1]
    assert POISONED_ROW in rows_
    assert f"at step {step}, batch {step} of epoch 0, rows {rows_}" in str(error.value)
    assert "--model.nonfinite_loss skip" in str(error.value)
    for name, weight in record.before[-1].items():  # the weights as they were before the poisoned batch
        torch.testing.assert_close(model.policy.state_dict()[name], weight, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "bco_pair"])
def test_skipped_step_changes_no_weight_optimizer_state_schedule_or_metric(tiny_llama, tmp_path, loss_type):
    # 12 pairs, micro-batches of 2, accumulation 2: 3 optimizer steps of 4 pairs; the poisoned micro-batch
    # is one of its step's two. Warm-up over 3 steps makes the learning rate differ at every step.
    record, rewards = RecordSteps(), {}

    class Rewards(L.Callback):  # bco_pair's implicit rewards of each batch, recomputed before its step
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            (policy, _), (ref, _) = (response_logps(m, batch) for m in (module.policy, module.reference))
            rewards[tuple(batch["row_ids"].tolist())] = 0.1 * (policy - ref)

    model, trainer, run = fit("skip", tiny_llama, tmp_path, accumulate=2, callbacks=[record, Rewards()],
                              loss_type=loss_type, warmup_steps=3)
    with pytest.warns(UserWarning, match=r"non-finite training loss .* this optimizer step is skipped"):
        run()
    assert len(record.steps) == 3 and sorted(sum((s["rows"] for s in record.steps), [])) == list(range(12))
    skipped = 1
    assert sorted(set(model.logged_at)) == [i for i in range(3) if i != skipped]  # no metric for the skipped step
    for i, step in enumerate(record.steps):
        previous = record.steps[i - 1]["weights"] if i else None
        if i == skipped:
            assert all(torch.equal(step["weights"][k], previous[k]) for k in previous)
            for key, state in record.steps[i - 1]["optimizer"].items():  # moments and step count as they were
                assert all(torch.equal(step["optimizer"][key][n], v) for n, v in state.items()), key
        elif previous is not None:
            assert any(not torch.equal(step["weights"][k], previous[k]) for k in previous)
    # Warm-up: lr = 1e-2 * (k + 1) / 4 after k scheduler steps, and a skipped step is not one.
    trained = [sum(1 for j in range(i + 1) if j != skipped) for i in range(3)]
    assert [s["lr"] for s in record.steps] == pytest.approx([1e-2 * (k + 1) / 4 for k in trained])
    assert all(torch.isfinite(w).all() for w in model.policy.state_dict().values())
    if loss_type == "bco_pair":
        # The running mean holds the trained steps' rewards only (a NaN in it would poison every later step).
        kept = torch.cat([r for rows, r in rewards.items() if not set(rows) & set(record.steps[skipped]["rows"])])
        assert model.objective.bco_reward_count.item() == kept.numel() == 2 * 8
        torch.testing.assert_close(model.objective.bco_reward_sum / model.objective.bco_reward_count, kept.double().mean(),
                                   rtol=1e-4, atol=1e-6)


def test_a_nan_validation_pair_stays_in_every_mean_it_enters_and_its_row_is_named(tiny_llama, tmp_path):
    # Row 5's rejected response holds the only "z" of the split, whose embedding row is NaN: its rejected log-prob,
    # its loss, its rejected reward and margin are NaN; its chosen response is clean. A validation value is the mean
    # over every pair of the split, so the first ones must read NaN (torchmetrics' default dropped the NaN and gave
    # the mean over the other 5 pairs) and the chosen log-prob the mean over all 6 (batches of 4 and 2).
    dataset = rows(6)
    dataset["rejected"][5] += "z"
    assert sum(text.count("z") for column in dataset.values() for text in column) == 1
    module = DPOModule(tiny_llama)
    with torch.no_grad():
        for model in (module.policy, module.reference):
            model.get_input_embeddings().weight[ord("z")] = float("nan")
    data = PreferenceDataModule(dataset=dataset, eval_dataset=dataset, tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=6, eval_batch_size=4, prefix_sharing=False)
    with pytest.warns(UserWarning, match=r"validation: 1 pair\(s\) with a non-finite loss or log-prob, rows \[5\]"):
        values = quiet_trainer(tmp_path).validate(module, data, verbose=False)[0]
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # all 6 pairs, padded: the oracle reads each sequence
    logps, _ = response_logps(module.policy, batch)
    order = batch["row_ids"].tolist()
    chosen = logps[:6][torch.tensor([order.index(i) for i in range(6)])]
    assert torch.isnan(logps[6 + order.index(5)]) and torch.isfinite(chosen).all()
    for name in ("loss", "logps/rejected", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logits/rejected"):
        assert math.isnan(values[f"val/{name}"]), name
    assert values["val/logps/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5)
