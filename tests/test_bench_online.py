"""The smoke test of benchmarks/bench_online.py (online DPO against TRL's OnlineDPOTrainer): `--quick` runs each
side 3 steps in its own process and prints the table; this checks its rows and columns, not its numbers (a few
steps on a shared machine measure nothing). The quickstart's bundled model and prompts only: no network.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("trl.experimental.online_dpo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ["side", "s/step (median)", "per round", "generate share (median)", "solve rate start",
           "solve rate end (median)", "per round"]


def test_online_benchmark_quick_mode_prints_the_table():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_online.py"), "--quick"],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in result.stdout.splitlines() if line.startswith("|") and not line.startswith("|---")]
    assert rows[0] == COLUMNS, result.stdout
    assert [row[0] for row in rows[1:]] == ["ours", "trl", "ours / trl"], result.stdout
    assert all(len(row) == len(COLUMNS) for row in rows), result.stdout
    for label in ("machine:", "load average", "versions: torch", ", trl ", "model: sort-tiny"):
        assert label in result.stdout, result.stdout
