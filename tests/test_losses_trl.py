"""Our losses against TRL's on the same random log-probs, for every loss TRL has.

TRL computes its losses inside trainer methods, so we build each trainer with `__new__` (no
`__init__`: no model, no dataset, no network), set only the attributes those methods read, and hand
them a stand-in model whose outputs are tensors we chose. Written against TRL 1.x
(`DPOTrainer._compute_loss`, `trl.experimental.cpo` / `orpo`); skipped when trl is not installed.

TRL returns the batch mean, so per-pair losses are compared one pair at a time (B = 1), except the AOT
losses, which sort within the batch and are compared as batch means. Not in TRL: dpop, rdpo, and
bco_pair's running-mean shift (TRL 1.16 has none), so bco_pair is compared at shift 0.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")
if int(trl.__version__.split(".")[0]) < 1:
    pytest.skip(f"written against TRL 1.x trainer internals, found {trl.__version__}", allow_module_level=True)

from trl import DPOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

from dpo_lightning.training.logps import sequence_logps  # noqa: E402
from dpo_lightning.data.batches import IGNORE_INDEX  # noqa: E402
from dpo_lightning.training.losses import LOSSES  # noqa: E402

B, T, V = 4, 6, 11  # pairs, response-token slots, vocabulary
ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x,
                              unwrap_model=lambda m: m)


def _random_pairs(seed: int = 0) -> dict:
    """Per-token policy log-probs for B chosen then B rejected responses of random lengths, plus reference sums."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (2 * B,), generator=gen)
    in_response = torch.arange(T) < lengths[:, None]  # (2B, T)
    per_token = -3 * torch.rand(2 * B, T, generator=gen) * in_response  # (2B, T), 0 past the response
    ref = per_token.sum(1) + torch.randn(2 * B, generator=gen)  # (2B,): reference within a few nats
    return {"per_token": per_token, "in_response": in_response, "lengths": lengths.float(), "ref": ref}


def _pick(pairs: dict, idx: list[int]) -> dict:
    """The pairs `idx` of `pairs`, keeping the layout [chosen..., rejected...]."""
    rows = idx + [B + i for i in idx]
    return {k: v[rows] for k, v in pairs.items()}


def _trl_dpo(loss_type: str, pairs: dict, beta: float, **options) -> tuple[torch.Tensor, dict]:
    """TRL's DPOTrainer loss (the batch mean) and logged metrics on these pairs, the reference precomputed."""
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=SimpleNamespace(training=True), accelerator=ACCELERATOR, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
        f_divergence_type=options.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=options.get("f_alpha_divergence_coef", 0.5),
        label_smoothing=options.get("label_smoothing", 0.0),
        args=SimpleNamespace(discopop_tau=options.get("discopop_tau", 0.05)),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    n = pairs["per_token"].shape[0]
    zeros = torch.zeros_like(pairs["per_token"])

    def model(**kwargs):  # TRL's patched forward: per-token log-probs (0 where labels are -100) and statistics
        return SimpleNamespace(log_probs=pairs["per_token"], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    # Column 0 is a one-token prompt: completion_mask[:, 1:] lines up with the log-prob columns.
    completion_mask = torch.cat([torch.zeros(n, 1), pairs["in_response"].float()], dim=1).long()
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": pairs["ref"][: n // 2],
              "ref_rejected_logps": pairs["ref"][n // 2:]}
    return trainer._compute_loss(model, inputs, return_outputs=False), trainer._metrics["train"]


def _ours(loss_type: str, pairs: dict, beta: float, mean: bool, **options) -> torch.Tensor:
    """Our per-pair losses on the same pairs; `mean` gives per-token means, as the module does for LENGTH_NORMALIZED."""
    policy, ref = pairs["per_token"].sum(1), pairs["ref"]
    if mean:
        policy, ref = policy / pairs["lengths"], ref / pairs["lengths"]
    losses, _, _ = LOSSES[loss_type](*policy.chunk(2), *ref.chunk(2), beta=beta, **options)
    return losses


# (our loss_type, TRL's loss_type, inputs are means, options): TRL 1.16 ignores label_smoothing in
# `sigmoid` (we keep cDPO), so it is compared at 0, the only value where the two agree.
DPO_CASES = [
    ("sigmoid", "sigmoid", False, {}),
    ("sigmoid", "sigmoid", False, {"f_divergence_type": "forward_kl"}),
    ("sigmoid", "sigmoid", False, {"f_divergence_type": "js_divergence"}),
    ("sigmoid", "sigmoid", False, {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
    ("robust", "robust", False, {"label_smoothing": 0.1}),
    ("hinge", "hinge", False, {}),
    ("ipo", "ipo", True, {}),
    ("exo_pair", "exo_pair", False, {"label_smoothing": 0.05}),
    ("nca_pair", "nca_pair", False, {}),
    ("bco_pair", "bco_pair", False, {}),
    ("sppo_hard", "sppo_hard", False, {}),
    ("apo_zero", "apo_zero", False, {}),
    ("apo_down", "apo_down", False, {}),
    ("discopop", "discopop", False, {"discopop_tau": 0.05}),
    ("sigmoid_norm", "sigmoid_norm", True, {}),
    ("sft", "sft", True, {}),
]


@pytest.mark.parametrize("ours, theirs, mean, options", DPO_CASES,
                         ids=[f"{c[0]}-{c[3].get('f_divergence_type', '')}".rstrip("-") for c in DPO_CASES])
def test_per_pair_losses_match_trl_dpo_trainer(ours, theirs, mean, options):
    pairs = _random_pairs()
    expected = torch.stack([_trl_dpo(theirs, _pick(pairs, [i]), beta=0.5, **options)[0] for i in range(B)])
    torch.testing.assert_close(_ours(ours, pairs, beta=0.5, mean=mean, **options), expected)


@pytest.mark.parametrize("ours, theirs", [("aot", "aot"), ("aot_pair", "aot_unpaired")])
def test_aot_batch_means_match_trl_dpo_trainer(ours, theirs):
    pairs = _random_pairs(seed=1)
    expected, _ = _trl_dpo(theirs, pairs, beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(_ours(ours, pairs, beta=0.5, mean=False, label_smoothing=0.1).mean(), expected)


def test_rewards_match_trl_for_summed_log_probs():
    # TRL logs the batch means of beta * log u from summed log-probs, for every loss type.
    pairs = _random_pairs(seed=2)
    _, metrics = _trl_dpo("sigmoid", pairs, beta=0.5)
    _, chosen_rewards, rejected_rewards = LOSSES["sigmoid"](*pairs["per_token"].sum(1).chunk(2),
                                                            *pairs["ref"].chunk(2), beta=0.5)
    torch.testing.assert_close(chosen_rewards.mean().item(), metrics["rewards/chosen"][-1])
    torch.testing.assert_close(rejected_rewards.mean().item(), metrics["rewards/rejected"][-1])


@pytest.mark.parametrize("a", [0.3, 0.8])
def test_alpha_divergence_coef_is_the_papers_alpha_and_trls_code_uses_one_minus_it(a):
    # Deliberate difference: f'(u) = (1 - u^-a) / a (Wang et al. Table 1, TRL's docs and TRL 0.x);
    # TRL 1.16's code computes (u^(a-1) - 1) / (a - 1), which is our formula at 1 - a.
    pairs = _random_pairs(seed=3)
    options = {"f_divergence_type": "alpha_divergence"}
    expected = torch.stack([_trl_dpo("sigmoid", _pick(pairs, [i]), beta=0.5, f_alpha_divergence_coef=a, **options)[0]
                            for i in range(B)])
    ours = _ours("sigmoid", pairs, beta=0.5, mean=False, f_alpha_divergence_coef=1 - a, **options)
    torch.testing.assert_close(ours, expected)


def _token_batch(seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One pair as token ids: a one-token prompt, responses padded to T; random logits for both rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2, T + 1), generator=gen)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX  # the prompt
    labels[1, 1 + int(torch.randint(1, T, (1,), generator=gen)):] = IGNORE_INDEX  # a shorter rejected response
    attention_mask = (labels != IGNORE_INDEX).long()
    attention_mask[:, 0] = 1
    batch = {f"{side}_{key}": value[row: row + 1] for row, side in enumerate(("chosen", "rejected"))
             for key, value in (("input_ids", ids), ("attention_mask", attention_mask), ("labels", labels))}
    return batch, torch.randn(2, T + 1, V, generator=gen), labels


def _trl_batch_loss(trainer_cls, logits: torch.Tensor, batch: dict, **attributes) -> torch.Tensor:
    """`trainer_cls.get_batch_loss_metrics` with a model that returns `logits`; returns the loss."""
    trainer = trainer_cls.__new__(trainer_cls)
    trainer.__dict__.update(accelerator=ACCELERATOR, is_encoder_decoder=False, aux_loss_enabled=False,
                            pad_token_id=0, padding_value=0, **attributes)
    loss, _ = trainer.get_batch_loss_metrics(lambda *args, **kwargs: SimpleNamespace(logits=logits), batch)
    return loss


@pytest.mark.parametrize("loss_type, trl_loss_type, cpo_alpha", [("cpo", "sigmoid", 1.0), ("simpo", "simpo", 0.0)])
def test_cpo_and_simpo_match_trl_cpo_trainer(loss_type, trl_loss_type, cpo_alpha):
    # TRL's CPOTrainer: preference term + cpo_alpha * chosen NLL; SimPO proper is cpo_alpha = 0.
    for seed in range(3):
        batch, logits, labels = _token_batch(seed)
        expected = _trl_batch_loss(CPOTrainer, logits, batch, loss_type=trl_loss_type, beta=2.0, label_smoothing=0.1,
                                   simpo_gamma=0.5, alpha=0.0, cpo_alpha=cpo_alpha)
        logps, n_tokens = sequence_logps(logits, labels)
        options = {"chosen_lengths": n_tokens[:1]} if loss_type == "cpo" else {"simpo_gamma": 0.5}
        if loss_type == "simpo":
            logps = logps / n_tokens  # SimPO takes per-token means (LENGTH_NORMALIZED)
        losses, _, _ = LOSSES[loss_type](*logps.chunk(2), *torch.zeros(2, 1), beta=2.0, label_smoothing=0.1,
                                         **options)
        torch.testing.assert_close(losses[0], expected)


def test_orpo_matches_trl_orpo_trainer():
    # TRL's ORPO NLL covers prompt and response tokens; with a one-token prompt (never a target after
    # the shift) that is exactly the chosen response's mean NLL, the paper's term, which we use.
    for seed in range(3):
        batch, logits, labels = _token_batch(seed)
        expected = _trl_batch_loss(ORPOTrainer, logits, batch, beta=0.1)
        logps, n_tokens = sequence_logps(logits, labels)
        losses, _, _ = LOSSES["orpo"](*(logps / n_tokens).chunk(2), *torch.zeros(2, 1), beta=0.1)
        torch.testing.assert_close(losses[0], expected)
