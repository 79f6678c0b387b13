"""`GenerateSamples` and `ValidationSummary` on tiny models saved to temp folders (conftest.py); no network.

What users read off a run: the samples table lands in the CSV and TensorBoard logs at every validation
(not the sanity check), the reference columns never change while the policy's do, a LoRA policy's
reference is its base weights, sampling is seeded without disturbing training's random state, and under
2-process DDP (gloo) rank 0 generates alone without deadlocking the other rank. The end of a run names
what it wrote and the commands that come next, and those commands run as printed.
"""

import csv
import shlex
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml
from conftest import ascii_tokenizer, data_module, quiet_trainer, rows
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from peft import LoraConfig, get_peft_model
from datasets import Dataset
from transformers import AutoModelForCausalLM

from dpo_lightning import DPOModule, ExportPretrained, PreferenceDataModule, ValidationSummary
from dpo_lightning.callbacks import GenerateSamples
from dpo_lightning.cli.main import cli_main, main

COLUMNS = ["prompt", "chosen", "policy/greedy", "reference/greedy", "policy/sampled", "reference/sampled"]


def sample_data() -> PreferenceDataModule:
    return PreferenceDataModule(dataset=rows(16), eval_dataset=rows(4), tokenizer=ascii_tokenizer(add_bos=True),
                                max_length=48, max_prompt_length=24, batch_size=4)


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_samples_table_reaches_csv_and_tensorboard_and_only_the_policy_moves(tiny_llama, tmp_path):
    samples = GenerateSamples(num_prompts=3, max_new_tokens=8)
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    trainer = L.Trainer(max_steps=6, val_check_interval=3, check_val_every_n_epoch=None, num_sanity_val_steps=1,
                        logger=loggers, callbacks=[samples], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(DPOModule(tiny_llama, learning_rate=5e-2), sample_data())

    tables = sorted((Path(loggers[0].log_dir) / "samples").glob("*.csv"))
    assert [p.name for p in tables] == ["step_3.csv", "step_6.csv"]  # none for the sanity check
    first, last = read_table(tables[0]), read_table(tables[1])
    assert list(last[0]) == COLUMNS and len(last) == 3
    # The ascii tokenizer decodes with a space between characters.
    assert [r["prompt"].replace(" ", "") for r in last] == [p.replace(" ", "") for p in rows(3)["prompt"]]
    for column in ("reference/greedy", "reference/sampled"):  # frozen model, same seeds: the same text
        assert [r[column] for r in first] == [r[column] for r in last]
    assert any(r["policy/greedy"] != r["reference/greedy"] for r in last)

    events = next((tmp_path / "tb").rglob("events.out.tfevents.*")).read_bytes()
    assert b"reference/greedy" in events and last[0]["reference/greedy"].encode() in events
    with open(Path(loggers[0].log_dir) / "metrics.csv") as f:
        lengths = [float(r["samples/length/policy_greedy"]) for r in csv.DictReader(f) if r["samples/length/policy_greedy"]]
    assert len(lengths) == 2 and all(1 <= n <= 8 for n in lengths)


def test_sampling_is_seeded_and_leaves_the_training_random_state_alone(tiny_llama):
    data = sample_data()
    data.setup("fit")
    samples = GenerateSamples(num_prompts=2, max_new_tokens=6)
    model, prompts = DPOModule(tiny_llama), samples.prompt_rows(data)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    table, _ = samples.generate(model, data.tokenizer, prompts)
    assert torch.equal(torch.get_rng_state(), state)
    again, _ = samples.generate(model, data.tokenizer, prompts)
    assert table == again
    # Policy == reference before training: same greedy and, with the same seeds, same sampled text.
    assert [r["policy/sampled"] for r in table] == [r["reference/sampled"] for r in table]


def test_lora_policy_without_a_reference_is_compared_with_its_base_weights(tiny_llama):
    tokenizer = ascii_tokenizer(add_bos=True)
    model = DPOModule(tiny_llama)
    model.policy = get_peft_model(model.policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.ref.model = None  # as DPOModule does with LoRA: the reference is the policy, adapter disabled
    with torch.no_grad():
        for name, param in model.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)  # an adapter that changes the answers
    samples = GenerateSamples(prompts=["Q0: say ab?", "Q1: say abab?"], max_new_tokens=6, sample=False)
    prompts = samples.prompt_rows(PreferenceDataModule(dataset=rows(2), tokenizer=tokenizer))
    assert prompts[0]["prompt_input_ids"][0] == tokenizer.bos_token_id  # tokenized as training does (rule 2)
    table, _ = samples.generate(model, tokenizer, prompts)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for row, prompt in zip(table, prompts):
        ids = torch.tensor([prompt["prompt_input_ids"]])
        out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                            pad_token_id=tokenizer.eos_token_id)
        assert row["reference/greedy"] == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert any(r["policy/greedy"] != r["reference/greedy"] for r in table)
    again, _ = samples.generate(model, tokenizer, prompts)
    assert again == table  # the adapter is back on after the reference's turn


def test_under_ddp_rank_zero_generates_alone_without_a_deadlock(tiny_llama, tmp_path):
    # Rank 0 generates between steps while rank 1 goes on to the next all-reduce and waits there.
    subprocess.run([sys.executable, __file__, tiny_llama, str(tmp_path)], check=True, timeout=300, cwd=tmp_path)
    tables = sorted(tmp_path.rglob("samples/*.csv"))
    assert [p.name for p in tables] == ["step_2.csv", "step_4.csv"]
    assert len(read_table(tables[-1])) == 2
    # The export at fit's end: rank 0 writes it under a temporary name and renames it in; rank 1 takes part in
    # gathering the weights and leaves nothing beside it.
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("hf")] == ["hf"]


def test_validation_history_survives_a_checkpoint(tiny_llama, tmp_path):
    # Validations at steps 0 (sanity check, whole split), 2 and 4; the run resumed from step 4's checkpoint
    # starts with those three and adds step 6's.
    def fit(max_steps: int, ckpt_path=None) -> ValidationSummary:
        summary = ValidationSummary()
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        quiet_trainer(tmp_path, max_steps=max_steps, val_check_interval=2, check_val_every_n_epoch=None,
                      num_sanity_val_steps=-1, callbacks=[summary, checkpoint]).fit(
            DPOModule(tiny_llama, learning_rate=1e-2), data_module(), ckpt_path=ckpt_path)
        return summary

    first = fit(4)
    assert [row["step"] for row in first.history] == [0, 2, 4]
    resumed = fit(6, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.history[:3] == first.history  # read back from the checkpoint file, every val/ metric
    assert [row["step"] for row in resumed.history] == [0, 2, 4, 6]
    assert resumed.history[3]["val/loss"] != first.history[2]["val/loss"]  # step 6 is a new validation


def test_the_end_of_fit_says_what_the_run_made_and_its_next_commands_run_as_printed(tiny_llama, tmp_path,
                                                                                    monkeypatch, capsys):
    # The run ended with the validation table alone: which folder, which checkpoints, what next was left to find.
    monkeypatch.chdir(tmp_path)
    Dataset.from_dict(rows(16)).to_json(tmp_path / "train.jsonl")
    Dataset.from_dict(rows(8)).to_json(tmp_path / "val.jsonl")
    best = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"monitor": "val/loss", "save_last": True}}
    config = {"model": {"model_name_or_path": tiny_llama, "learning_rate": 1e-2},
              "data": {"dataset": "train.jsonl", "eval_dataset": "val.jsonl", "max_length": 48,
                       "max_prompt_length": 24, "batch_size": 4},
              "trainer": {"max_steps": 4, "val_check_interval": 2, "check_val_every_n_epoch": None,
                          "num_sanity_val_steps": -1, "enable_progress_bar": False,
                          "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs", "name": "run"}},
                          "callbacks": [{"class_path": "dpo_lightning.ValidationSummary"},
                                        {"class_path": "dpo_lightning.ExportPretrained"}, best]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cli = cli_main(["fit", "--config", "run.yaml"])
    out = capsys.readouterr().out
    report = out[out.index("[dpo_lightning] step 0 -> 4"):].splitlines()

    with open(tmp_path / "runs" / "run" / "version_0" / "metrics.csv") as f:
        validations = [row for row in csv.DictReader(f) if row["val/loss"]]
    first, last = validations[0], validations[-1]  # step 0, and after step 4 (logged on row 3)
    assert report[0] == ("[dpo_lightning] step 0 -> 4: reward accuracy "
                         f"{float(first['val/rewards/accuracies']):.4f} -> {float(last['val/rewards/accuracies']):.4f}"
                         f", margin {float(first['val/rewards/margins']):.4f} -> "
                         f"{float(last['val/rewards/margins']):.4f}")
    checkpoint = next(c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint))
    best_name = Path(checkpoint.best_model_path).name
    assert report[1] == "[dpo_lightning] this run wrote, in runs/run/version_0/:"
    assert [line.split()[0] for line in report[2:6]] == ["metrics.csv", f"checkpoints/{best_name}",
                                                         "checkpoints/last.ckpt", "hf_model/"]
    assert f"val/loss {checkpoint.best_model_score:.4f}" in report[3]

    assert report[6] == "[dpo_lightning] next:"
    commands = [shlex.split(line) for line in report[7:]]
    assert [c[:2] for c in commands] == [["dpo-lightning", "plot"], ["dpo-lightning", "export"],
                                         ["dpo-lightning", "validate"]]
    for command in commands:
        main(command[1:])
    assert (tmp_path / "runs" / "run" / "version_0" / "metrics.png").is_file()
    assert (tmp_path / "my_model" / "model.safetensors").is_file()
    assert "[dpo_lightning] validation metrics: runs/run/version_1/metrics.csv" in capsys.readouterr().out
    assert (tmp_path / "runs" / "run" / "version_1" / "metrics.csv").is_file()


if __name__ == "__main__":
    model_path, out = sys.argv[1], Path(sys.argv[2])
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, val_check_interval=2,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=CSVLogger(out),
                        callbacks=[GenerateSamples(num_prompts=2, max_new_tokens=4), ExportPretrained(str(out / "hf"))],
                        enable_progress_bar=False,
                        enable_model_summary=False)  # checkpointing on: its barrier waits for rank 0's samples
    trainer.fit(DPOModule(model_path, learning_rate=1e-2), sample_data())


def test_samples_stop_at_the_models_end_of_turn_and_show_what_the_rewards_read(tiny_llama):
    # A chat model's generation config names its end of turn beside EOS. Samples stop there, as GreedyReward and
    # online DPO do, and the table shows the answer without it: the text those rewards score.
    tokenizer = ascii_tokenizer(add_bos=True)
    model = DPOModule(tiny_llama)
    samples = GenerateSamples(prompts=["Q0: say ab?"], max_new_tokens=8, sample=False)
    prompts = samples.prompt_rows(PreferenceDataModule(dataset=rows(2), tokenizer=tokenizer))
    ids = torch.tensor([prompts[0]["prompt_input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    greedy = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    stop = greedy[2]  # the third token the model writes is made its end of turn
    model.policy.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    table, lengths = samples.generate(model, tokenizer, prompts)
    answer = greedy[:greedy.index(stop)]
    assert table[0]["policy/greedy"] == table[0]["reference/greedy"] == tokenizer.decode(answer, skip_special_tokens=True)
    assert lengths["policy_greedy"] == len(answer) + 1  # the stop token counts in the length, as EOS does
