"""`reference.py` on its own: the cache key and the weights' fingerprints, the per-rank scoring shares, and
the frozen reference's mode (eval within its forward only, so Lightning's "modules in eval mode" count
leaves it out).

Tiny models from conftest.py and stand-ins for the Trainer; no network (the hub is mocked).
"""

import contextlib
import importlib
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import lightning as L
import pytest
import torch
from conftest import ascii_tokenizer, rows

import dpo_lightning.training.logps
from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.training.logps import naive_logps
from dpo_lightning.training.refcache import cache_key, files_fingerprint, rank_share, score_reference


def test_the_reference_is_identified_by_its_weight_files_or_its_hub_commit(tiny_llama, tmp_path, monkeypatch):
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    assert files_fingerprint(str(copy)) == files_fingerprint(tiny_llama)  # content, not the path
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\0")
    assert files_fingerprint(str(copy)) != files_fingerprint(tiny_llama)  # one byte of the weights
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name, allow_patterns: f"/cache/models--org--m/snapshots/{name[-1]}c0ffee/")
    assert files_fingerprint("org/m1") == "org/m1@1c0ffee" != files_fingerprint("org/m2")


def test_the_cache_key_follows_the_log_prob_code(tmp_path, monkeypatch):
    # Content, not the path: a copy of logps.py keys the same; one changed line, another key (old tables unused).
    key = cache_key("weights", "32-true", "data")
    copy = tmp_path / "logps.py"
    copy.write_text(Path(dpo_lightning.training.logps.__file__).read_text())
    monkeypatch.setattr(dpo_lightning.training.logps, "__file__", str(copy))
    assert cache_key("weights", "32-true", "data") == key
    copy.write_text(copy.read_text().replace("IGNORE_INDEX", "IGNORE_INDEX ", 1))
    assert cache_key("weights", "32-true", "data") != key


@pytest.mark.parametrize("module", ["dpo_lightning.data.batches", "dpo_lightning.data.packing",
                                    "dpo_lightning.data.layouts", "dpo_lightning.utils.hf"])
def test_the_cache_key_follows_every_module_the_log_probs_run_through(module, tmp_path, monkeypatch):
    # A fix to the labelling rule (batches.py), the shared layout's labels and mask, or the model helpers changes
    # the stored log-probs as much as one in logps.py: each must change the key.
    imported = importlib.import_module(module)
    key = cache_key("weights", "32-true", "data")
    copy = tmp_path / "copy.py"
    copy.write_text(Path(imported.__file__).read_text() + "\n# a fix\n")
    monkeypatch.setattr(imported, "__file__", str(copy))
    assert cache_key("weights", "32-true", "data") != key


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_gets_an_equal_share_and_every_row_once(world):
    for n in range(1, 12):
        shares = [rank_share(n, rank, world) for rank in range(world)]
        per_rank = (n + world - 1) // world  # ceil: as many forwards on every rank, however n divides
        assert all(len(indices) == per_rank for indices, _ in shares), (n, world)
        own = sorted(i for indices, count in shares for i in indices[:count])
        assert own == list(range(n)), (n, world)  # the padding past `count` is never kept


def test_scoring_on_two_ranks_runs_as_many_batches_each_and_sums_to_the_one_rank_table():
    # 7 pairs, one a batch: rank 0 scores rows 0 2 4 6, rank 1 rows 1 3 5 and a discarded padding row. The
    # "reference" sums each sequence's token ids, so the table is known from the tokens alone.
    data = PreferenceDataModule(dataset=rows(7), tokenizer=ascii_tokenizer(), max_length=48, max_prompt_length=24,
                                batch_size=1)
    data.setup("fit")
    calls = []

    def token_sums(batch):
        calls[-1] += 1
        return (batch["input_ids"] * batch["attention_mask"]).sum(1).float()  # (2B,)

    tables = []
    for rank in range(2):
        strategy = SimpleNamespace(root_device=torch.device("cpu"), batch_to_device=lambda b: b,
                                   reduce=lambda table, reduce_op: table)  # the other rank's share is added below
        trainer = SimpleNamespace(global_rank=rank, world_size=2, strategy=strategy,
                                  precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
        calls.append(0)
        tables.append(score_reference(trainer, data, {"train": data.train_data}, token_sums, contextlib.nullcontext,
                                      batch_size=1)["train"])
    assert calls == [4, 4]
    expected = torch.tensor([[sum(r["prompt_input_ids"] + r["chosen_input_ids"]),
                              sum(r["prompt_input_ids"] + r["rejected_input_ids"])]
                             for r in sorted(data.train_data, key=lambda r: r["row_id"])], dtype=torch.float32)
    torch.testing.assert_close(tables[0] + tables[1], expected)


def fit_one_step(model: DPOModule, root) -> list[str]:
    """The warnings a one-step fit emits, as messages."""
    data = PreferenceDataModule(dataset=rows(4), tokenizer=ascii_tokenizer(), max_length=48, max_prompt_length=24,
                                batch_size=4)
    trainer = L.Trainer(max_steps=1, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, data)
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("separate", [False, True], ids=["copy", "ref_model_name_or_path"])
def test_a_frozen_reference_is_not_counted_as_a_module_in_eval_mode(tiny_llama, other_llama, tmp_path, separate):
    # Lightning warns "Found 33 module(s) in eval mode at the start of training" for a reference kept in eval.
    model = DPOModule(tiny_llama, ref_model_name_or_path=other_llama if separate else None)
    assert not any("in eval mode" in message for message in fit_one_step(model, tmp_path))


def test_a_users_module_left_in_eval_mode_is_still_reported(tiny_llama, tmp_path):
    model = DPOModule(tiny_llama)
    mlp = model.policy.model.layers[0].mlp.eval()  # the policy's, not the reference's: exactly these are counted
    counted = f"Found {len(list(mlp.modules()))} module(s) in eval mode"  # the mlp, its 3 projections, act_fn
    assert any(message.startswith(counted) for message in fit_one_step(model, tmp_path))


def test_the_reference_runs_without_dropout_while_the_module_trains(tiny_gpt2):
    # GPT-2's dropout 0.1, kept: in train mode a policy forward is random, the reference's never is.
    model = DPOModule(tiny_gpt2, disable_dropout=False).train()
    data = PreferenceDataModule(dataset=rows(4), tokenizer=ascii_tokenizer(), max_length=48, max_prompt_length=24,
                                batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        assert not torch.equal(naive_logps(model.policy, batch)[0], naive_logps(model.policy, batch)[0])
        expected = naive_logps(model.reference.eval(), batch)[0]
        model.reference.train()
        for _ in range(2):
            torch.testing.assert_close(model.ref.logps(model.policy, batch, "train"), expected)
    assert model.reference.training  # its mode is restored after each forward


def test_a_checkpoint_of_the_previous_format_keeps_its_cache_key_and_counts_as_trained(tiny_llama):
    # Before `reference` held both facts, checkpoints carried `reference_fingerprint` and the step alone.
    model = DPOModule(tiny_llama, precompute_ref_log_probs=True)
    model.ref.load_checkpoint_state({"reference_fingerprint": "f00d", "global_step": 3})
    assert (model.ref.fingerprint, model.ref.policy_trained) == ("f00d", True)
    model.ref.load_checkpoint_state({"reference": {"fingerprint": None, "policy_trained": False}, "global_step": 3})
    assert (model.ref.fingerprint, model.ref.policy_trained) == (None, False)  # the recorded fact wins
