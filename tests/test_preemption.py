"""Preemption: SIGTERM (or SLURM's SIGUSR1) in the middle of an optimizer step saves a checkpoint at the end
of that step and stops the process; `fit(ckpt_path=...)` from it then trains on exactly the batches an
uninterrupted run trains on, and ends at the same weights.

Each run is a subprocess executing this file, so a real signal stops a real process. The run signals
itself at the start of a chosen micro-batch (a fixed point inside a step, whose checkpoint step the test
knows), and then, as a cluster would, the test sends SIGTERM from outside at whatever moment it lands. Tiny Llama from conftest.py, 12 pairs in batches of 2, 2 micro-batches per optimizer
step: 3 steps an epoch, and 5 steps cross into the second epoch; online, the same rows' prompts. No network.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ACCUMULATE, MAX_STEPS = 2, 5


def fit(tiny_llama: str, out: Path, signal_at: int = -1, signal_name: str = "SIGTERM", ckpt_path: Path | None = None,
        env: dict | None = None, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run this file; it writes each micro-batch's `row_ids` to `out/rows.jsonl` and, if it finishes, `out/policy.pt`."""
    out.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, __file__, tiny_llama, str(out), str(signal_at), signal_name, str(ckpt_path or "")]
    kwargs = dict(cwd=out, env={**os.environ, **(env or {})}, text=True)
    if wait:
        return subprocess.run(args, timeout=600, capture_output=True, **kwargs)
    # Running on while the test polls: its output goes to a file, which never fills up and blocks it as a pipe can.
    return subprocess.Popen(args, stdout=open(out / "output.txt", "w"), stderr=subprocess.STDOUT, **kwargs)


def seen(out: Path) -> list[list[int]]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def logged(out: Path, names=("train/loss", "val/loss")) -> dict[str, list[tuple[int, float]]]:
    """The run's metrics.csv as (step, value) of each of `names`, in the order written."""
    with open(out / "logs" / "version_0" / "metrics.csv") as f:
        lines = list(csv.DictReader(f))
    return {name: [(int(line["step"]), float(line[name])) for line in lines if line.get(name)] for name in names}


def test_sigterm_mid_step_saves_at_the_step_end_and_the_resumed_run_matches_an_uninterrupted_one(tiny_llama,
                                                                                                   tmp_path):
    straight = fit(tiny_llama, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    # Micro-batch 2 opens step 2 (micro-batches 2 and 3): the run must finish that step, then stop.
    stopped = fit(tiny_llama, tmp_path / "stopped", signal_at=2)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    ckpt = tmp_path / "stopped" / "preempted.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    assert len(seen(tmp_path / "stopped")) == 4 and not (tmp_path / "stopped" / "policy.pt").exists()

    resumed = fit(tiny_llama, tmp_path / "resumed", ckpt_path=ckpt)
    assert resumed.returncode == 0, resumed.stderr
    assert len(seen(tmp_path / "straight")) == ACCUMULATE * MAX_STEPS
    assert seen(tmp_path / "stopped") + seen(tmp_path / "resumed") == seen(tmp_path / "straight")
    expected = torch.load(tmp_path / "straight" / "policy.pt", weights_only=True)
    actual = torch.load(tmp_path / "resumed" / "policy.pt", weights_only=True)
    for name, weight in expected.items():
        torch.testing.assert_close(actual[name], weight)
    # Every step's training loss and every validation is logged once, in one run or the other: the step the
    # checkpoint holds (step 2, with the validation due after micro-batch 4) in the stopped run.
    straight_log, stopped_log, resumed_log = (logged(tmp_path / run) for run in ("straight", "stopped", "resumed"))
    assert [step for step, _ in straight_log["val/loss"]][:1] == [1]  # Lightning logs step 2's as step index 1
    for name in ("train/loss", "val/loss"):
        assert [step for step, _ in stopped_log[name] + resumed_log[name]] == [step for step, _ in straight_log[name]]
        torch.testing.assert_close([v for _, v in stopped_log[name] + resumed_log[name]],
                                   [v for _, v in straight_log[name]])
    assert stopped_log["val/loss"] == straight_log["val/loss"][:1]

    # The same with SIGTERM sent by another process, wherever in a step it lands: here once 3 micro-batches
    # have started (each paced to 0.5 s so that the signal arrives before the run ends).
    running = fit(tiny_llama, tmp_path / "killed", env={"PACE_SECONDS": "0.5"}, wait=False)
    deadline = time.monotonic() + 300
    while not (tmp_path / "killed" / "rows.jsonl").exists() or len(seen(tmp_path / "killed")) < 3:
        assert running.poll() is None and time.monotonic() < deadline, (tmp_path / "killed" / "output.txt").read_text()
        time.sleep(0.02)
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=600) == 128 + signal.SIGTERM, (tmp_path / "killed" / "output.txt").read_text()
    resumed = fit(tiny_llama, tmp_path / "resumed_after_kill", ckpt_path=tmp_path / "killed" / "preempted.ckpt")
    assert resumed.returncode == 0, resumed.stderr
    assert seen(tmp_path / "killed") + seen(tmp_path / "resumed_after_kill") == seen(tmp_path / "straight")
    actual = torch.load(tmp_path / "resumed_after_kill" / "policy.pt", weights_only=True)
    for name, weight in expected.items():
        torch.testing.assert_close(actual[name], weight)


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    return [float(len(c)) for c in completions]


def test_an_online_run_killed_mid_step_resumes_sampling_and_training_as_an_uninterrupted_one(tiny_llama, tmp_path):
    # The same runs online: the 12 rows' prompts, 3 completions each, scored by length (`ONLINE=1`).
    online = {"ONLINE": "1"}
    straight = fit(tiny_llama, tmp_path / "straight", env=online)
    assert straight.returncode == 0, straight.stderr
    stopped = fit(tiny_llama, tmp_path / "stopped", signal_at=2, env=online)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    resumed = fit(tiny_llama, tmp_path / "resumed", ckpt_path=tmp_path / "stopped" / "preempted.ckpt", env=online)
    assert resumed.returncode == 0, resumed.stderr
    assert seen(tmp_path / "stopped") + seen(tmp_path / "resumed") == seen(tmp_path / "straight")
    expected = torch.load(tmp_path / "straight" / "policy.pt", weights_only=True)
    actual = torch.load(tmp_path / "resumed" / "policy.pt", weights_only=True)
    for name, weight in expected.items():
        torch.testing.assert_close(actual[name], weight)
    names = ("train/loss", "train/objective/scores", "train/objective/ties", "val/loss")
    straight_log, stopped_log, resumed_log = (logged(tmp_path / run, names) for run in ("straight", "stopped",
                                                                                         "resumed"))
    for name in names:  # each step's samples, scores and loss, logged once, in one run or the other
        assert [step for step, _ in stopped_log[name] + resumed_log[name]] == [step for step, _ in straight_log[name]]
        torch.testing.assert_close([v for _, v in stopped_log[name] + resumed_log[name]],
                                   [v for _, v in straight_log[name]], msg=name)


def test_sigusr1_under_slurm_saves_then_requeues_the_job(tiny_llama, tmp_path):
    # A stand-in `scontrol` records its arguments; the SLURM variables make Lightning pick SLURMEnvironment,
    # whose auto_requeue is on by default.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "dpo",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}
    stopped = fit(tiny_llama, tmp_path / "run", signal_at=3, signal_name="SIGUSR1", env=slurm)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr
    assert torch.load(tmp_path / "run" / "preempted.ckpt", weights_only=False)["global_step"] == 2
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


if __name__ == "__main__":
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import ascii_tokenizer, rows

    from dpo_lightning import DPOModule, PreferenceDataModule
    from dpo_lightning.callbacks import PreemptionCheckpoint

    class Record(L.Callback):
        """Appends each micro-batch's row ids to rows.jsonl; sends this process a signal at micro-batch `at`."""

        def __init__(self, path: Path, at: int, signum: int):
            self.path, self.at, self.signum, self.count = path, at, signum, 0

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            with open(self.path, "a") as f:
                f.write(json.dumps(batch["row_ids"].tolist()) + "\n")
            if self.count == self.at:
                os.kill(os.getpid(), self.signum)
            self.count += 1
            time.sleep(float(os.environ.get("PACE_SECONDS", 0)))

    policy, out, signal_at, signum = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), signal.Signals[sys.argv[4]]
    L.seed_everything(0)
    online = {"reward_funcs": "test_preemption.length_reward", "num_samples": 3, "max_new_tokens": 6}
    model = DPOModule(policy, learning_rate=1e-2, warmup_steps=3, online=online if os.environ.get("ONLINE") else None)
    data = PreferenceDataModule(dataset=rows(12), eval_dataset=rows(4), tokenizer=ascii_tokenizer(), max_length=48,
                                max_prompt_length=24, batch_size=2)
    # Logged at every step, validated every 4 micro-batches: after step 2 of each epoch.
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, accumulate_grad_batches=ACCUMULATE,
                        default_root_dir=out, logger=CSVLogger(out, name="logs", version=0), log_every_n_steps=1,
                        val_check_interval=4, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Record(out / "rows.jsonl", signal_at, signum), PreemptionCheckpoint()])
    trainer.fit(model, data, ckpt_path=sys.argv[5] or None)
    torch.save(model.policy.state_dict(), out / "policy.pt")
