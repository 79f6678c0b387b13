"""Preference metrics: exact over a split however it is batched, accumulated or split across ranks.

`MarginLengthCorrelation` is checked against Python's own `statistics.correlation`; the module-level
checks run tiny models (conftest.py) through Lightning on CPU. No network.
"""

import csv
import math
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import data_module

from dpo_lightning import DPOModule
from dpo_lightning.training.metrics import MarginLengthCorrelation, batch_values
from dpo_lightning.training.objective import ObjectiveOutput


def test_margin_length_correlation_matches_pearson_across_batches():
    margins, lengths = [0.5, 2.0, -1.0, 3.5, 0.0], [1.0, 4.0, -2.0, 5.0, 2.0]
    metric = MarginLengthCorrelation()
    metric.update(torch.tensor(margins[:2]), torch.tensor(lengths[:2]))
    metric.update(torch.tensor(margins[2:]), torch.tensor(lengths[2:]))
    assert metric.compute().item() == pytest.approx(statistics.correlation(margins, lengths), rel=1e-6)


def test_margin_length_correlation_is_zero_when_lengths_never_differ():
    metric = MarginLengthCorrelation()
    metric.update(torch.tensor([0.5, 2.0, -1.0]), torch.zeros(3))
    assert metric.compute().item() == 0.0


def test_ties_count_half_and_logits_are_token_weighted():
    # Pair 0 wins, pair 1 ties, pair 2 loses: accuracy (1 + 0.5 + 0) / 3.
    rewards_c, rewards_r = torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    out = ObjectiveOutput(torch.tensor(0.0), torch.zeros(3), {"sigmoid": torch.zeros(3)}, rewards_c, rewards_r)
    values = batch_values(out, torch.zeros(6), torch.arange(6.0), torch.tensor([1, 3, 1, 2, 2, 2]))
    accuracy, _ = values["rewards/accuracies"]
    assert accuracy.mean().item() == pytest.approx(0.5)
    logits, weights = values["logits/chosen"]  # per-sequence means [0, 1, 2] over 1, 3, 1 tokens
    assert (logits * weights).sum() / weights.sum() == pytest.approx((0 * 1 + 1 * 3 + 2 * 1) / 5)


def fit_and_validate(policy: str, reference: str, batch_size: int, accumulate: int, eval_batch_size: int,
                     root) -> tuple[DPOModule, dict, dict]:
    L.seed_everything(0)
    data = data_module(16, eval_n=10, batch_size=batch_size, eval_batch_size=eval_batch_size)
    model = DPOModule(policy, ref_model_name_or_path=reference, learning_rate=1e-3)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=accumulate, log_every_n_steps=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root)
    trainer.fit(model, data)
    # Every metric but how densely packing fills rows, which depends on the batch size.
    train_metrics = {k: v.item() for k, v in trainer.logged_metrics.items()
                     if k.startswith("train/") and not k.endswith("pairs_per_row")}
    validator = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    val_metrics = {k: v for k, v in validator.validate(model, data, verbose=False)[0].items()
                   if not k.endswith("pairs_per_row")}
    return model, train_metrics, val_metrics


def test_metrics_are_exact_under_batch_size_and_gradient_accumulation(tiny_llama, other_llama, tmp_path):
    # 8 pairs a step, as one batch or as 4 micro-batches of 2; validated in batches of 2 vs 8 (10 pairs:
    # uneven last batch). Same weights, so every metric must agree, the per-step training ones included.
    one, train_one, val_one = fit_and_validate(tiny_llama, other_llama, 8, 1, 8, tmp_path)
    acc, train_acc, val_acc = fit_and_validate(tiny_llama, other_llama, 2, 4, 2, tmp_path)
    # AdamW divides each gradient by its own scale, so an element near zero (a vocabulary row the batch
    # barely touches) turns the float32 rounding of another summation order into a visible update: allow a
    # tenth of one step's update (lr 1e-3); a wrong accumulation moves every weight by up to the whole step.
    for name, weight in one.policy.state_dict().items():
        torch.testing.assert_close(acc.policy.state_dict()[name], weight, rtol=1e-4, atol=1e-4)
    assert set(train_one) == set(train_acc) and "train/rewards/margin_length_corr" in train_one
    for name, value in train_one.items():
        assert train_acc[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert set(val_one) == set(val_acc) and len(val_one) == 12
    for name, value in val_one.items():
        assert val_acc[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert not any(math.isnan(v) for v in val_one.values())


def test_validate_fit_validate_on_one_module_and_trainer_equals_each_run_alone(tiny_llama, tmp_path):
    # A notebook looks at the baseline first: trainer.validate, then trainer.fit, then validate again, on one
    # module and one Trainer. Validation states made under validate's inference mode used to be updated in
    # place under fit's no-grad sanity check ("Inplace update to inference tensor outside InferenceMode").
    def trainer() -> L.Trainer:
        return L.Trainer(max_steps=2, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=1,
                         log_every_n_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)

    def module() -> DPOModule:
        L.seed_everything(0)
        return DPOModule(tiny_llama, learning_rate=1e-3)

    alone = module()
    alone_trainer = trainer()
    alone_trainer.fit(alone, data_module(8, eval_n=6))
    alone_train = {k: v.item() for k, v in alone_trainer.logged_metrics.items() if k.startswith("train/")}
    alone_val = trainer().validate(alone, data_module(8, eval_n=6), verbose=False)[0]

    model, shared, data = module(), trainer(), data_module(8, eval_n=6)
    before = shared.validate(model, data, verbose=False)[0]
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: ln 2
    assert before["val/rewards/accuracies"] == 0.5
    shared.fit(model, data)
    train = {k: v.item() for k, v in shared.logged_metrics.items() if k.startswith("train/")}
    after = shared.validate(model, data, verbose=False)[0]
    for name, weight in alone.policy.state_dict().items():
        torch.testing.assert_close(model.policy.state_dict()[name], weight)
    assert train.keys() == alone_train.keys()
    for name, value in alone_train.items():
        assert train[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert after.keys() == alone_val.keys() and after["val/loss"] < math.log(2)
    for name, value in alone_val.items():
        assert after[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


class GradientBeforeClipping(L.Callback):
    """Each optimizer step's learning rate and whole-gradient norm, computed here from the parameters' .grad in
    float64: callbacks see the step before the module's hook and before Lightning clips (AMP: after unscaling)."""

    def __init__(self):
        self.norms, self.rates = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad.double().flatten() for p in module.policy.parameters() if p.grad is not None]
        self.norms.append(torch.cat(grads).norm().item())
        self.rates.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_learning_rate_and_gradient_norm_are_logged_each_step_before_clipping(tiny_llama, tmp_path, precision):
    # warmup_steps 2 at 1e-3: the steps apply 1e-3 * 1/3, 2/3, then 1e-3 (lr_factor's (k + 1) / (w + 1)). The
    # gradient is clipped to 1e-4, far under its norm, so a norm read after clipping would show 1e-4. 16-mixed
    # (fp16 with a loss scale of 2^16 on CPU) checks that the norm is read after unscaling.
    from lightning.pytorch.plugins import MixedPrecision

    plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))] if precision == "16-mixed" else []
    seen = GradientBeforeClipping()
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, gradient_clip_val=1e-4, log_every_n_steps=1,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path), callbacks=[seen], plugins=plugins,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(DPOModule(tiny_llama, learning_rate=1e-3, warmup_steps=2), data_module(16, eval_n=0, batch_size=2))
    with open(Path(trainer.log_dir) / "metrics.csv") as f:
        logged = {int(row["step"]): row for row in csv.DictReader(f) if row["train/grad_norm"]}
    assert sorted(logged) == [0, 1, 2, 3]
    assert [float(logged[s]["train/learning_rate"]) for s in range(4)] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3,
                                                                                         1e-3])
    assert seen.rates == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    assert min(seen.norms) > 1e-2  # far over the clipping bound
    if precision == "16-mixed":  # about 1.9 as in float32, not 2^16 times that: unscaled
        assert trainer.precision_plugin.scaler.get_scale() == 2 ** 16 and max(seen.norms) < 100
    assert [float(logged[s]["train/grad_norm"]) for s in range(4)] == pytest.approx(seen.norms, rel=1e-5)


def test_training_metrics_logged_every_n_steps_are_the_means_over_the_steps_since_the_last_log(tiny_llama, other_llama,
                                                                                               tmp_path):
    # TRL's logging_steps: a logged value is the mean over every pair of the steps since the previous log, not the
    # logging step's alone. Oracle: the same run (same seed, same weights step by step) logging every step; its
    # per-step values, averaged by hand over each window of 3 steps (8 pairs a step, 2 micro-batches of 4).
    final = {}

    def rows(every: int) -> list[dict]:
        L.seed_everything(0)
        model = DPOModule(tiny_llama, ref_model_name_or_path=other_llama, learning_rate=1e-3)
        trainer = L.Trainer(max_steps=6, accumulate_grad_batches=2, log_every_n_steps=every,
                            logger=L.pytorch.loggers.CSVLogger(tmp_path, name=f"every{every}"),
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(model, data_module(48, batch_size=4, prefix_sharing=False))
        final[every] = {name: float(value) for name, value in trainer.callback_metrics.items()}
        with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
            return [row for row in csv.DictReader(f) if row.get("train/loss")]

    each, windows = rows(1), rows(3)
    assert [int(row["step"]) for row in each] == list(range(6)) and [int(r["step"]) for r in windows] == [2, 5]
    for window, steps in zip(windows, (each[0:3], each[3:6])):
        for name in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen"):
            assert float(window[name]) == pytest.approx(statistics.fmean(float(s[name]) for s in steps),
                                                        rel=1e-4, abs=1e-6), name
        # The rate and the gradient norm are the logging step's own, as TRL logs them.
        for name in ("train/learning_rate", "train/grad_norm"):
            assert float(window[name]) == pytest.approx(float(steps[-1][name]), rel=1e-5), name
    # The run's last step logs too, off the interval: when fit returns, callback_metrics hold the mean over the
    # steps since the last log (steps 5 and 6 with a log every 4 steps), not nothing and not a stale value.
    rows(4)
    assert final[4]["train/loss"] == pytest.approx(statistics.fmean(float(s["train/loss"]) for s in each[4:6]),
                                                   rel=1e-4)
