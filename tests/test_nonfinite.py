"""A NaN loss never reaches the weights: the run stops naming the step and the rows, or skips the batch.

The policy's log-probs are poisoned for the batch that holds row 5 (12 pairs in batches of 4, not
shuffled across the check: the row's batch and step are read from the run itself).
"""

import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer, rows

from dpo_lightning import DPOModule, PreferenceDataModule

POISONED_ROW = 5


class PoisonedRow(DPOModule):
    def _sequence_logps(self, model, batch):
        logps, mean_logits, n_tokens = super()._sequence_logps(model, batch)
        if torch.is_grad_enabled() and POISONED_ROW in batch["row_ids"]:  # the policy's pass, in training
            logps = logps * float("nan")
        return logps, mean_logits, n_tokens


class Record(L.Callback):
    """Each batch's rows and the policy's weights before it (`weights`) and after it (`after`)."""

    def __init__(self):
        self.batches, self.weights, self.after = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(batch["row_ids"].tolist())
        self.weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append({k: v.clone() for k, v in module.policy.state_dict().items()})


def fit(nonfinite_loss, tiny_llama, tmp_path):
    L.seed_everything(0)
    record = Record()
    model = PoisonedRow(tiny_llama, learning_rate=1e-2, nonfinite_loss=nonfinite_loss)
    data = PreferenceDataModule(dataset=rows(12), tokenizer=ascii_tokenizer(), max_length=48, max_prompt_length=24,
                                batch_size=4)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[record])
    return model, trainer, record, lambda: trainer.fit(model, data)


def test_nan_loss_stops_the_run_naming_step_and_rows_before_any_update(tiny_llama, tmp_path):
    model, trainer, record, run = fit("stop", tiny_llama, tmp_path)
    with pytest.raises(FloatingPointError) as error:
        run()
    step, rows_ = len(record.batches) - 1, record.batches[-1]
    assert POISONED_ROW in rows_
    assert f"at step {step}, batch {step} of epoch 0, rows {rows_}" in str(error.value)
    assert "--model.nonfinite_loss skip" in str(error.value)
    for name, weight in record.weights[-1].items():  # the weights as they were before the poisoned batch
        torch.testing.assert_close(model.policy.state_dict()[name], weight, rtol=0, atol=0)


def test_skipped_nan_batch_makes_no_optimizer_step_and_the_run_goes_on(tiny_llama, tmp_path):
    model, trainer, record, run = fit("skip", tiny_llama, tmp_path)
    with pytest.warns(UserWarning, match=r"non-finite training loss .* skipped"):
        run()
    assert len(record.batches) == len(record.after) == 3  # the run went on to the end of the epoch
    for rows_, before, after in zip(record.batches, record.weights, record.after):
        moved = any(not torch.equal(before[k], after[k]) for k in before)
        assert moved == (POISONED_ROW not in rows_), rows_  # only the poisoned batch changed nothing
    assert all(torch.isfinite(w).all() for w in model.policy.state_dict().values())
    assert all(torch.isfinite(torch.tensor(v)) for k, v in trainer.callback_metrics.items() if k.startswith("train/"))
