"""Seconds from `dpo-lightning ...` to its exit, for commands that do no training (issue 22, item 13).

    python benchmarks/startup.py                          # this checkout
    python benchmarks/startup.py --checkout ../other --repeat 5

Each command runs `--repeat` times in a fresh process (`python -m dpo_lightning.cli.main`, the console script's
code, run from the checkout's root so that its package is the one imported); the table gives the median and the fastest. Wall time depends on
the disk cache and on other load: compare two checkouts back to back on a quiet machine.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def seconds(checkout: Path, args: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dpo_lightning.cli.main", *args], cwd=checkout, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="a dpo_lightning checkout (default: this one)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trl_args = Path(tmp) / "args.json"
        trl_args.write_text('{"beta": 0.1, "learning_rate": 5e-7, "loss_type": "sigmoid", "max_steps": 1000}')
        commands = {"--help": ["--help"], "from-trl": ["from-trl", str(trl_args)], "plot -h": ["plot", "-h"],
                    "fit --help": ["fit", "--help"]}
        print(f"{'command':<12} {'median s':>9} {'fastest s':>10}")
        for name, command in commands.items():
            times = seconds(args.checkout, command, args.repeat)
            print(f"{name:<12} {statistics.median(times):>9.2f} {min(times):>10.2f}")


if __name__ == "__main__":
    main()
