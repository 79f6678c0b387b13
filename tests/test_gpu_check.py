"""benchmarks/gpu_check.py --smoke: the GPU check's every code path, on CPU with a tiny model, so that the
script a GPU session runs once (in one command, with minutes to spare) cannot rot between those sessions.

The smoke run builds a tiny Qwen2-shaped model from a config and synthetic pairs, so it needs no network.
It runs in a subprocess, as a GPU session would run it; PYTHONPATH reaches it from the environment.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_smoke_runs_every_row_and_the_measured_paths_agree_with_naive(tmp_path):
    env = {**os.environ, "DPO_BENCH_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path / "out")],
                   check=True, env=env, cwd=tmp_path, timeout=900)
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["name"]: row for row in summary["rows"]}
    expected = [row.name for row in gpu_check.ROWS] + list(gpu_check.SHARDED)
    assert list(rows) == expected
    # Each row measured, or skipped because CPU cannot run it; a failure is a broken path.
    for name, row in rows.items():
        assert row["status"] in ("measured", "skipped"), (name, row.get("reason"), row.get("traceback"))
        if row["status"] == "skipped":
            assert row["reason"].startswith("no GPU: "), (name, row["reason"])
    skipped = {name for name, row in rows.items() if row["status"] == "skipped"}
    assert skipped == {"packing flex_attention", "qlora", "torch_compile", "fsdp"}
    for name, row in rows.items():
        if row["status"] == "measured" and "s_per_step" in row:
            assert row["s_per_step"] > 0 and row["tokens_per_s"] > 0
            assert row["check"]["ok"] is True, (name, row["check"], row["first_logps"], rows["naive"]["first_logps"])
    # FSDP2 on one CPU process (gloo): the resumed run ends at the uninterrupted run's weights, after moving
    # them, and the exported folder holds those weights.
    fsdp2 = rows["fsdp2"]
    assert fsdp2["same_weights_after_resume"] and fsdp2["export_equals_resumed"]
    assert fsdp2["policy_tensors"] > 0 and fsdp2["weights_moved"] == fsdp2["policy_tensors"]
    markdown = (tmp_path / "out" / "results.md").read_text()
    for name in expected:
        assert f"| {name} |" in markdown
