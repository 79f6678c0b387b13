"""Online DPO (online/: config.py, sampler.py, rewards.py, greedy.py): pairs sampled by the policy during training
and ranked by a reward; its typed settings through the CLI and Python, keyed sampling, DDP with ties on one rank.
Faults (failing rewards, ties, long prompts) are in test_faults.py, resume in test_resume.py and
test_preemption.py, FSDP2 in test_fsdp2.py, the architecture matrix in test_architectures.py.

Tiny Llama and the ASCII tokenizer from conftest.py; the data's prompts are `conftest.rows`' (a preference
set: online training reads its prompts only). The rewards below are plain functions of the completion text,
named by import path (`test_online.<name>`) as a config names them. `RECORD` keeps what each call saw.
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import ascii_tokenizer, data_module, quiet_trainer, rows
from datasets import Dataset
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from dpo_lightning import DPOModule, PreferenceDataModule
from dpo_lightning.online import GreedyReward, OnlineConfig
from dpo_lightning.online.sampler import pick_pairs
from dpo_lightning.online.rewards import Rewards
from dpo_lightning.utils.generation import KeyedSampling, complete, generation_config, sampling
from dpo_lightning.utils.tokenizers import with_pad_token

ROOT = Path(__file__).resolve().parents[1]
SORT_TINY = ROOT / "dpo_lightning" / "assets" / "sort-tiny"
RECORD: list[tuple[list[str], list[str], list[float]]] = []


def mod3_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Sum of the completion's character codes mod 3: ties are frequent, which the tests need."""
    scores = [float(sum(map(ord, c)) % 3) for c in completions]
    RECORD.append((list(prompts), list(completions), scores))
    return scores


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(len(c)) for c in completions]


def fails_on_rank_1_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """`length_reward`, but rank 1's second call (step 1) raises."""
    RECORD.append((list(prompts), list(completions), []))
    if torch.distributed.get_rank() == 1 and len(RECORD) == 2:
        raise RuntimeError("rank 1's scorer is down")
    return length_reward(prompts, completions)


def tied_on_rank_0_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Every completion scores 1 on rank 0 (all its prompts tie); elsewhere each scores its position (none tie)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return [1.0] * len(completions) if rank == 0 else [float(i) for i in range(len(completions))]


ONLINE = {"reward_funcs": "test_online.mod3_reward", "num_samples": 3, "max_new_tokens": 6}


class Pairs(L.Callback):
    """Each training batch as it trained (the pairs), the policy after each step, and the global random state."""

    def __init__(self):
        self.batches, self.weights, self.rng_equal = [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._rng = torch.get_rng_state()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        trained = outputs["batch"]  # the pairs sampled from this batch's prompts
        self.batches.append({k: v.clone() for k, v in trained.items() if isinstance(v, torch.Tensor)})
        self.weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})
        self.rng_equal.append(torch.equal(self._rng, torch.get_rng_state()))


def fit(policy, root, max_steps=3, ckpt_path=None, callbacks=(), seed=0, **online):
    L.seed_everything(seed)
    record = Pairs()
    model = DPOModule(policy, learning_rate=1e-2, online={**ONLINE, **online})
    data = data_module(12, eval_n=0, max_length=32, max_prompt_length=16)
    trainer = quiet_trainer(root, max_steps=max_steps, callbacks=[record, *callbacks], log_every_n_steps=1)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, record


def test_pick_pairs_takes_the_best_and_the_worst_and_flags_ties():
    # Row 0: best 0.9 (col 1), worst 0.2 (col 0). Row 1: all equal, a tie. Row 2: two worst at -1 (col 1, 2):
    # the first; two best at 0.3 (col 0, 3): the first.
    scores = torch.tensor([[0.2, 0.9, 0.5, 0.4], [1.0, 1.0, 1.0, 1.0], [0.3, -1.0, -1.0, 0.3]])
    chosen, rejected, untied = pick_pairs(scores)
    assert chosen.tolist() == [1, 0, 0] and rejected.tolist() == [0, 0, 1] and untied.tolist() == [True, False, True]


def test_each_pair_is_its_prompts_best_and_worst_sample_and_ties_are_skipped_and_counted(tiny_llama, tmp_path):
    RECORD.clear()
    logged = {}

    class Logged(DPOModule):
        def log(self, name, value, *args, **kwargs):
            logged.setdefault(name, []).append(float(value))
            return super().log(name, value, *args, **kwargs)

    L.seed_everything(0)
    record = Pairs()
    model = Logged(tiny_llama, learning_rate=1e-2, online=ONLINE)
    # The padded layout, whose rows this test reads back one pair side per row.
    data = data_module(12, eval_n=0, max_length=32, max_prompt_length=16, prefix_sharing=False,
                       seed=42)  # an order whose samples hold both tied and untied prompts
    quiet_trainer(tmp_path, max_steps=3, callbacks=[record], log_every_n_steps=1).fit(model, data)
    tokenizer = ascii_tokenizer()
    assert len(RECORD) == 3
    ties = []
    for (prompts, completions, scores), batch in zip(RECORD, record.batches):
        expected = []
        for i in range(0, len(scores), 3):  # 3 samples of one prompt
            assert len(set(prompts[i:i + 3])) == 1
            best, worst = max(scores[i:i + 3]), min(scores[i:i + 3])
            ties.append(best == worst)
            if best != worst:
                expected.append((prompts[i], completions[i + scores[i:i + 3].index(best)],
                                 completions[i + scores[i:i + 3].index(worst)]))
        # The batch: chosen rows then rejected rows, the prompt masked in the labels, the response
        # the sampled ids, through EOS (id 2) where the model stopped.
        n = len(expected)
        assert batch["input_ids"].shape[0] == 2 * n
        for k, (prompt, chosen, rejected) in enumerate(expected):
            for row, response in ((k, chosen), (n + k, rejected)):
                labels, ids = batch["labels"][row], batch["input_ids"][row][batch["attention_mask"][row].bool()]
                response_ids = labels[labels != -100].tolist()
                prompt_ids = ids[:len(ids) - len(response_ids)].tolist()
                assert prompt_ids == [ord(c) for c in prompt]  # the reward read the prompt as written: its ids, one per character
                if 2 in response_ids:
                    assert response_ids.index(2) == len(response_ids) - 1
                assert tokenizer.decode(response_ids, skip_special_tokens=True) == response
    assert 0 < sum(ties) < len(ties)  # the case needs both
    # One value per step: the share of that step's prompts that tied (4 prompts a step).
    assert logged["train/objective/ties"] == pytest.approx([sum(ties[i:i + 4]) / 4 for i in range(0, 12, 4)])
    all_scores = [s for _, _, scores in RECORD for s in scores]
    assert logged["train/objective/scores"] == pytest.approx(
        [sum(all_scores[i:i + 12]) / 12 for i in range(0, 36, 12)])


def test_keyed_sampling_draws_from_the_softmax_and_a_rows_completion_ignores_the_rest_of_the_batch(tiny_llama):
    # The distribution: one row of fixed scores, 20000 keys. softmax([0, 1, 2, log 3]) = [1, e, e^2, 3] / total;
    # each frequency within 4 standard deviations of its probability.
    scores = torch.tensor([[0.0, 1.0, 2.0, math.log(3.0)]])
    keys = list(range(20_000))
    picks = [int((KeyedSampling([key], torch.device("cpu"))(None, scores)).argmax()) for key in keys]
    weights = [1.0, math.e, math.e ** 2, 3.0]
    for token, weight in enumerate(weights):
        p = weight / sum(weights)
        assert abs(picks.count(token) / len(keys) - p) < 4 * math.sqrt(p * (1 - p) / len(keys)), token
    # A row's completion: the same alone, or beside longer prompts (left padding) in another order, on its key.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    config = generation_config(with_pad_token(ascii_tokenizer()), [2], 8)
    prompts, cpu = [[1, 81, 58, 32], [1, 72, 105, 32, 116, 104, 101, 114, 101], [1, 66]], torch.device("cpu")
    alone = complete(model, prompts[:1], config, cpu, sampling([7], cpu, temperature=1.3, top_k=20, top_p=0.9))
    batch = complete(model, prompts[::-1], config, cpu, sampling([5, 6, 7], cpu, temperature=1.3, top_k=20,
                                                                   top_p=0.9))
    assert alone[0] == batch[2] and len(set(map(tuple, batch))) == 3


def test_same_seed_same_pairs_and_the_training_random_state_untouched(tiny_llama, tmp_path):
    _, first = fit(tiny_llama, tmp_path / "a")
    _, again = fit(tiny_llama, tmp_path / "b")
    _, other = fit(tiny_llama, tmp_path / "c", seed=1)
    for a, b in zip(first.batches, again.batches):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert any(not torch.equal(a["input_ids"], c["input_ids"]) for a, c in zip(first.batches, other.batches))
    assert all(first.rng_equal)  # sampling drew from its own generator, not the global one


def test_reference_kept_at_the_start_or_synced_every_n_steps(tiny_llama, tmp_path):
    start = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    kept, _ = fit(tiny_llama, tmp_path / "kept", max_steps=4)
    synced, record = fit(tiny_llama, tmp_path / "synced", max_steps=4, ref_model_sync_steps=2)
    for name, weight in kept.reference.state_dict().items():
        torch.testing.assert_close(weight, start[name], rtol=0, atol=0)
    # Synced at the start of step 2 (0-based) to the weights after step 1; not again before step 4.
    for name, weight in synced.reference.state_dict().items():
        torch.testing.assert_close(weight, record.weights[1][name], rtol=0, atol=0)
    assert any(not torch.equal(synced.policy.state_dict()[k], record.weights[1][k]) for k in start)


def test_resume_mid_run_samples_and_trains_as_an_unbroken_run(tiny_llama, tmp_path):
    # 3 batches an epoch; the checkpoint after step 4 is mid-epoch. The reference is synced at the start of
    # step 3 (0-based), before it, and not at step 4: the resumed run must take it from the checkpoint.
    straight, straight_record = fit(tiny_llama, tmp_path / "straight", max_steps=6, ref_model_sync_steps=3)
    every_4 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tiny_llama, tmp_path / "first", max_steps=4, callbacks=[every_4], ref_model_sync_steps=3)
    resumed, resumed_record = fit(tiny_llama, tmp_path / "second", max_steps=6, ref_model_sync_steps=3,
                                  ckpt_path=tmp_path / "ckpt" / "epoch=1-step=4.ckpt")
    assert len(resumed_record.batches) == 2
    for a, b in zip(straight_record.batches[4:], resumed_record.batches):
        assert torch.equal(a["input_ids"], b["input_ids"])
    for name, weight in straight.policy.state_dict().items():
        torch.testing.assert_close(resumed.policy.state_dict()[name], weight)
    for name, weight in straight.reference.state_dict().items():
        torch.testing.assert_close(resumed.reference.state_dict()[name], weight)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=2)
    path = tmp_path_factory.mktemp("reward_model")
    LlamaForSequenceClassification(config).save_pretrained(path)
    ascii_tokenizer().save_pretrained(path)
    return str(path)


def test_reward_model_scores_prompt_and_completion_and_weights_add_up(reward_model):
    model = LlamaForSequenceClassification.from_pretrained(reward_model).eval()
    prompts, completions = ["Q: a?", "Q: longer one?"], [" yes", " no way"]
    with torch.no_grad():  # the oracle: the logit at each text's last token, one unpadded text at a time
        oracle = [model(torch.tensor([[ord(c) for c in p + c_]])).logits[0, 0].item()
                  for p, c_ in zip(prompts, completions)]
    torch.testing.assert_close(Rewards(reward_model)(prompts, completions), torch.tensor(oracle, dtype=torch.float64))
    combined = Rewards(["test_online.length_reward", reward_model], [2.0, 0.5])(prompts, completions)
    torch.testing.assert_close(combined, torch.tensor([2.0 * 4 + 0.5 * oracle[0], 2.0 * 7 + 0.5 * oracle[1]],
                                                      dtype=torch.float64))


def test_reward_named_in_yaml_trains_through_the_cli(tiny_llama, reward_model, tmp_path, caplog):
    from dpo_lightning.cli.main import cli_main

    train = tmp_path / "train.jsonl"
    Dataset.from_dict({"prompt": rows(8)["prompt"]}).to_json(train)  # prompts only
    config = {"model": {"model_name_or_path": tiny_llama, "online": {
        "reward_funcs": ["test_online.mod3_reward", reward_model], "reward_weights": [1.0, 0.0],
        "num_samples": 2, "max_new_tokens": 4}},
              "data": {"dataset": str(train), "max_length": 32, "max_prompt_length": 16, "batch_size": 4},
              "trainer": {"max_steps": 2, "logger": False, "enable_progress_bar": False,
                          "enable_checkpointing": False, "default_root_dir": str(tmp_path)}}
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(config))
    RECORD.clear()
    cli = cli_main(["fit", "--config", str(path)])
    assert cli.trainer.global_step == 2 and len(RECORD) == 2
    assert [type(f).__name__ for f in cli.model.online.rewards.funcs] == ["function", "RewardModel"]
    # The run says it is online, what it samples and what scores it (an offline run's console looked the same).
    assert ("[dpo_lightning] online DPO: training reads prompts; the policy writes 2 completions per prompt (up to 4 "
            f"tokens, temperature 1), scored by test_online.mod3_reward + 0 x {reward_model}; the best and the worst "
            "form its pair") in caplog.messages
    with pytest.raises(ValueError, match="--model.online: unknown key.*'temprature'"):
        DPOModule(tiny_llama, online={**ONLINE, "temprature": 0.5})
    with pytest.raises(ValueError, match="entry 'no_such_module.score': cannot import"):
        DPOModule(tiny_llama, online={**ONLINE, "reward_funcs": "no_such_module.score"})


def test_online_settings_are_typed_checked_and_listed_on_the_command_line_and_in_python(tiny_llama, tmp_path,
                                                                                       monkeypatch, capsys):
    from dpo_lightning.cli.main import cli_main

    monkeypatch.chdir(tmp_path)  # the quickstart's logs and export go here
    quickstart = ["fit", "--config", str(ROOT / "configs" / "online_quickstart.yaml")]
    cli = cli_main([*quickstart, "--model.online.max_new_tokens", "8", "--trainer.max_steps", "1",
                    "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
                    "--trainer.num_sanity_val_steps", "0"])
    config = cli.model.online.config
    assert isinstance(config, OnlineConfig) and config.max_new_tokens == 8 and config.num_samples == 4
    assert cli.trainer.global_step == 1 and cli.trainer.callback_metrics["train/completions/mean_length"] <= 8
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main([*quickstart, "--model.online.temperature", "0.7", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["online"]
    assert printed == {"reward_funcs": "dpo_lightning.online.rewards.sort_closeness", "reward_weights": None,
                       "num_samples": 4, "max_new_tokens": 10, "temperature": 0.7, "top_p": 1.0, "top_k": 0,
                       "missing_eos_penalty": None, "ref_model_sync_steps": None, "seed": None}
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.online.help", "OnlineConfig"])
    listed = capsys.readouterr().out
    assert "--model.online.max_new_tokens" in listed and "tokens generated per completion at most" in listed
    for flag, value, says in (("max_new_tokens", "eight", 'Parser key "model.online"'),  # refused while parsing
                              ("temprature", "0.7", "unknown key 'temprature' in the model.online section "
                                                    "(--model.online.temprature); did you mean 'temperature'")):
        with pytest.raises(SystemExit):
            cli_main([*quickstart, f"--model.online.{flag}", value, "--print_config"])
        err = capsys.readouterr().err
        assert says in err and (flag != "max_new_tokens" or "Expected a <class 'int'>. Got value: eight" in err), err
    with pytest.raises(ValueError, match="--model.online.num_samples must be an integer >= 2; got 1"):  # checked
        cli_main([*quickstart, "--model.online.num_samples", "1"])

    # From Python: a dict of the same keys (TRL-style) or the dataclass, one path; the checkpoint keeps plain data.
    as_dict, as_config = (DPOModule(tiny_llama, online=online) for online in (ONLINE, OnlineConfig(**ONLINE)))
    assert as_dict.online.config == as_config.online.config == OnlineConfig(**ONLINE)
    assert as_dict.hparams["online"] == as_config.hparams["online"] == dataclasses.asdict(OnlineConfig(**ONLINE))
    with pytest.raises(ValueError, match=r"--model.online.max_new_tokens must be an integer >= 1; got '8' \(str\)"):
        DPOModule(tiny_llama, online={**ONLINE, "max_new_tokens": "8"})


def greedy_solved(model, rows_: list[dict], eos: int) -> float:
    """The oracle: each prompt completed greedily by repeated plain forwards (argmax, no cache; prompts of one
    length together, so nothing is padded), solved when the answer is the row's chosen (sorted) text, then EOS,
    within 10 tokens."""
    from dpo_lightning.tools.quickstart import build_tokenizer

    tokenizer, solved = build_tokenizer(), 0
    by_length = {}
    for row in rows_:
        by_length.setdefault(len(row["prompt"]), []).append(row)
    for group in by_length.values():
        ids = torch.tensor([tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in group])
        with torch.no_grad():
            for _ in range(10):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        for row, new in zip(group, ids[:, -10:].tolist()):
            solved += eos in new and tokenizer.decode(new[:new.index(eos)]) == row["chosen"]
    return solved / len(rows_)


def test_val_reward_greedy_is_the_exact_sort_rate_of_greedy_answers(tmp_path):
    val = [json.loads(line) for line in (SORT_TINY / "val.jsonl").read_text().splitlines()]
    model = DPOModule(str(SORT_TINY))
    data = PreferenceDataModule(dataset=val[:8], eval_dataset=val, max_length=32, max_prompt_length=16,
                                batch_size=64)
    greedy = GreedyReward("dpo_lightning.online.rewards.sort_exact", max_new_tokens=10, batch_size=100)
    metrics = quiet_trainer(tmp_path, callbacks=[greedy]).validate(model, data, verbose=False)[0]
    oracle = greedy_solved(model.policy.eval(), val, model.policy.config.eos_token_id)
    assert 0 < oracle < 1
    assert metrics["val/reward/greedy"] == pytest.approx(oracle, abs=1e-6)
    # Both quickstarts name this reward for it.
    for name in ("quickstart.yaml", "online_quickstart.yaml"):
        callbacks = yaml.safe_load((ROOT / "configs" / name).read_text())["trainer"]["callbacks"]
        assert {"class_path": "dpo_lightning.online.GreedyReward", "init_args": {
            "reward_funcs": "dpo_lightning.online.rewards.sort_exact", "max_new_tokens": 10}} in callbacks, name


def test_ddp_two_ranks_each_complete_their_own_prompts_and_a_rank_whose_prompts_all_tie_waits_for_none(tiny_llama,
                                                                                                        tmp_path):
    # Rank 0's prompts all tie at every step, rank 1's never: rank 0 trains a stand-in with weight 0 (every rank
    # must run the gradient all-reduce), and the step logs the ties of all 4 prompts and rank 1's pairs alone.
    out = tmp_path / "ddp.json"
    subprocess.run([sys.executable, __file__, tiny_llama, str(out), "tied_on_rank_0_reward"], check=True, timeout=600,
                   cwd=tmp_path)
    result = json.loads(out.read_text())
    prompts = [set(sum(rank, [])) for rank in result["prompt_rows"]]
    assert prompts[0] and prompts[1] and not prompts[0] & prompts[1]  # each rank's own prompts
    assert result["pair_rows"][0] != result["pair_rows"][1]
    for rank in range(2):  # the pairs a rank trained on come from its own prompts
        assert set(sum(result["pair_rows"][rank], [])) <= prompts[rank]
    assert result["same_weights"] and result["moved"]
    for step in result["metrics"]:  # 2 of the step's 4 prompts tied; rank 1's 2 pairs score 2 - 0 each
        assert step["train/objective/ties"] == 0.5 and step["train/objective/scores_margin"] == 2.0
        assert all(value == value for value in step.values()) and "train/loss" in step


def test_ddp_a_reward_failing_on_one_rank_stops_every_rank_naming_it(tiny_llama, tmp_path):
    # Rank 1's reward raises at step 1: rank 0, whose reward scored, must not wait for it in the step's all-reduce.
    done = subprocess.run([sys.executable, __file__, tiny_llama, str(tmp_path / "ddp.json"), "fails_on_rank_1_reward"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and not (tmp_path / "ddp.json").exists()
    assert ("--model.online.reward_funcs entry 'test_online.fails_on_rank_1_reward' raised at training step 1: "
            "RuntimeError: rank 1's scorer is down") in done.stderr
    assert "--model.online.reward_funcs: a reward failed on another rank at training step 1" in done.stderr


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    policy, out, reward = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    class Rows(L.Callback):
        def __init__(self):
            self.prompt_rows, self.pair_rows = [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.prompt_rows.append(batch["row_ids"].tolist())

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.pair_rows.append(outputs["batch"]["row_ids"].tolist())
            self.metrics = getattr(self, "metrics", []) + [{k: float(v) for k, v in trainer.callback_metrics.items()}]

    L.seed_everything(0)
    online = {**ONLINE, "reward_funcs": f"test_online.{reward}"}
    model = DPOModule(policy, learning_rate=1e-2, online=online)
    start = {k: v.clone() for k, v in model.policy.state_dict().items()}
    rows_cb = Rows()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False, log_every_n_steps=1,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, callbacks=[rows_cb])
    trainer.fit(model, data_module(16, eval_n=0, batch_size=2, max_length=32, max_prompt_length=16))
    flat = torch.cat([v.flatten() for v in model.policy.state_dict().values()])
    gathered = trainer.strategy.all_gather(flat)
    everything = [None, None]
    torch.distributed.all_gather_object(everything, (rows_cb.prompt_rows, rows_cb.pair_rows))
    if trainer.is_global_zero:
        out.write_text(json.dumps({
            "prompt_rows": [e[0] for e in everything], "pair_rows": [e[1] for e in everything],
            "metrics": rows_cb.metrics,
            "same_weights": bool(torch.equal(gathered[0], gathered[1])),
            "moved": any(not torch.equal(model.policy.state_dict()[k], v) for k, v in start.items())}))
