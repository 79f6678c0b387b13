"""W&B, MLflow and TensorBoard for real, end to end through `dpo-lightning fit` with a config.

W&B runs offline (`WANDB_MODE=offline`; its `.wandb` record log is read back here with a 20-line reader
of its LevelDB-style format and wandb's own protobuf), MLflow on a local file store (read with
`MlflowClient`), TensorBoard's event file with tensorboard's `EventAccumulator`. A run trains 2 steps,
checkpoints, and a second command resumes it to step 4 with the same W&B id and MLflow run id. Each
logger must hold the metrics under TRL's names at the steps they were logged (the resumed part
continuing, not restarting), the `GenerateSamples` table of each validation, and the exported model
card. A tiny model from conftest.py; no network.
"""

import json
import struct
from pathlib import Path

import pytest
import yaml
from conftest import rows
from datasets import Dataset

from dpo_lightning.cli.main import cli_main

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
mlflow_tracking = pytest.importorskip("mlflow.tracking")
wandb = pytest.importorskip("wandb")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

RUN_ID = "dpo-test-run"
TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")


def wandb_records(path: Path) -> list:
    """The records of a `.wandb` file: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); a block's tail under 7 bytes is padding."""
    data, records, pending, pos = path.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(run_dir: Path) -> tuple[str, dict[int, dict[str, float]]]:
    """(run id, {trainer/global_step: metrics}) of an offline run folder."""
    history, run_id = {}, None
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = items.pop("trainer/global_step", None)
            if step is not None:
                history.setdefault(int(step), {}).update(
                    {k: v for k, v in items.items() if isinstance(v, (int, float)) and not k.startswith("_")})
    return run_id, history


def write_config(tmp_path: Path, tiny_llama: str, max_steps: int, mlflow_run_id: str | None) -> Path:
    train = tmp_path / "train.jsonl"
    Dataset.from_dict(rows(16)).to_json(train)
    mlflow = {"tracking_uri": f"file:{tmp_path / 'mlruns'}", "experiment_name": "dpo"}
    loggers = [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": str(tmp_path / "tb"), "name": "dpo", "version": 0}},
        # id + resume "allow": a resumed command continues the same W&B run.
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"save_dir": str(tmp_path), "project": "dpo", "offline": True, "id": RUN_ID, "resume": "allow"}},
        {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
         "init_args": {**mlflow, **({"run_id": mlflow_run_id} if mlflow_run_id else {})}},
    ]
    callbacks = [{"class_path": "dpo_lightning.ValidationSummary"},
                 {"class_path": "dpo_lightning.GenerateSamples", "init_args": {"num_prompts": 2, "max_new_tokens": 4}},
                 {"class_path": "dpo_lightning.ExportPretrained", "init_args": {"dirpath": str(tmp_path / "hf_model")}},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 2, "save_top_k": -1}}]
    config = {"model": {"model_name_or_path": tiny_llama, "learning_rate": 1e-2},
              "data": {"dataset": str(train), "eval_dataset": str(train), "max_length": 48, "max_prompt_length": 24,
                       "batch_size": 4},
              "trainer": {"max_steps": max_steps, "val_check_interval": 2, "check_val_every_n_epoch": None,
                          "num_sanity_val_steps": 0, "log_every_n_steps": 1, "enable_progress_bar": False,
                          "logger": loggers, "callbacks": callbacks}}
    path = tmp_path / f"config_{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_llama):
    """2 steps, then resumed from the step-2 checkpoint to step 4, with W&B, MLflow and TensorBoard."""
    tmp_path = tmp_path_factory.mktemp("loggers")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
        first = cli_main(["fit", "--config", str(write_config(tmp_path, tiny_llama, 2, None))])
        run_id = next(lg for lg in first.trainer.loggers if type(lg).__name__ == "MLFlowLogger").run_id
        checkpoint = next((tmp_path / "ckpt").glob("*step=2.ckpt"))
        end_of_process()
        cli_main(["fit", "--config", str(write_config(tmp_path, tiny_llama, 4, run_id)), f"--ckpt_path={checkpoint}"])
        end_of_process()
    return tmp_path, run_id


def end_of_process() -> None:
    """What the end of a command's process does for W&B: finish the run, then shut the wandb service down.

    `wandb.finish()` alone returns before the service has closed the run's stream: it only posts "finished"
    for the stream named by the run id. The resumed run has the same id, so in one process that late
    message could close the second run's stream instead, which then wrote no records (its id read as None;
    7 of 20 same-id pairs in a loop here). `wandb.teardown()` waits for the service process to exit, as the
    exit of a real command does, so the next run starts a fresh service.
    """
    wandb.finish()
    wandb.teardown()


def test_wandb_offline_run_continues_with_metrics_samples_and_card(resumed_run):
    tmp_path, _ = resumed_run
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one folder per command; `wandb sync` joins them by id
    (first_id, first), (second_id, second) = wandb_run(runs[0]), wandb_run(runs[1])
    assert first_id == second_id == RUN_ID
    # Training metrics of optimizer step N are logged at trainer/global_step N - 1: 0, 1 then, resumed, 2, 3.
    assert [s for s in first if "train/loss" in first[s]] == [0, 1]
    assert [s for s in second if "train/loss" in second[s]] == [2, 3]
    for name in TRL_NAMES:
        assert f"train/{name}" in first[0] and f"val/{name}" in second[3], name
    assert "train/tokens_per_second" in first[1] and "train/padding_fraction" in first[1]
    for run in runs:
        (table_file,) = (run / "files" / "media" / "table").glob("samples_*.table.json")
        table = json.loads(table_file.read_text())
        assert table["columns"] == ["prompt", "chosen", "policy/greedy", "reference/greedy", "policy/sampled",
                                    "reference/sampled"] and len(table["data"]) == 2
        assert "## Validation metrics" in (run / "files" / "hf_model" / "README.md").read_text()
    assert "after 4 optimizer steps" in (runs[1] / "files" / "hf_model" / "README.md").read_text()


def test_mlflow_file_store_run_continues_with_metrics_samples_and_card(resumed_run):
    tmp_path, run_id = resumed_run
    client = mlflow_tracking.MlflowClient(f"file:{tmp_path / 'mlruns'}")
    assert len(client.search_runs([client.get_experiment_by_name("dpo").experiment_id])) == 1  # resumed, not new
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3]
    assert [m.step for m in client.get_metric_history(run_id, "val/rewards/accuracies")] == [1, 3]
    for name in TRL_NAMES:
        assert client.get_metric_history(run_id, f"train/{name}"), name
    assert client.get_metric_history(run_id, "train/tokens_per_second")
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/step_2.json", "samples/step_4.json"]
    table = json.loads(Path(client.download_artifacts(run_id, "samples/step_4.json", str(tmp_path))).read_text())
    assert "policy/greedy" in table["columns"] and len(table["data"]) == 2
    card = client.download_artifacts(run_id, "hf_model/README.md", str(tmp_path / "dl"))
    assert "after 4 optimizer steps" in Path(card).read_text()


def test_tensorboard_event_file_holds_metrics_samples_and_card(resumed_run):
    tmp_path, _ = resumed_run
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "dpo" / "version_0"),
                                                size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert {f"val/{name}" for name in TRL_NAMES} <= set(events.Tags()["scalars"])
    texts = set(events.Tags()["tensors"])
    assert {"samples/text_summary", "hf_model/text_summary"} <= texts
    card = events.Tensors("hf_model/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "after 4 optimizer steps" in card
