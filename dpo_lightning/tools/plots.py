"""Training curves from a run's CSV log: the headline first (the greedy reward, when `GreedyReward` logs it, and
in the title), then loss, reward accuracy, margins, rewards and log-probs, train vs val, and when the log has
them online DPO's sampled scores, ties and lengths, the learning rate and gradient norm, and the throughput
(tokens per second, padding fraction, MFU).

    dpo-lightning plot runs/quickstart              # the newest version_N that trained: its metrics.png
    dpo-lightning plot runs/quickstart/version_0/metrics.csv --out curves.png

Reads the `metrics.csv` that Lightning's CSVLogger writes (our default logger) with the standard library
and draws with matplotlib's object API (a `Figure`, rendered by Agg), so it never touches pyplot's
global state or a notebook's backend. matplotlib is a dependency (setup.cfg): axes, ticks, legends and
PNG output are what it is for, and a hand-written plotter would be worse at each.

A panel whose quantity has a natural range is drawn over it (accuracy and padding fraction from 0 to 1;
loss, learning rate, gradient norm and throughput from 0): autoscaled, a padding fraction moving between
0.19 and 0.22 fills the panel and reads as a trend.
"""

import csv
import os
from pathlib import Path

from dpo_lightning.utils.atomic import atomic_path
from dpo_lightning.utils.locate import NotFoundError, existing

# One panel per entry: its title, the metrics drawn in it without the train/ or val/ prefix, and its y range
# (None: autoscaled; a None bound is matplotlib's choice). The run's headline comes first when the log has it: the
# greedy answers' mean reward (`GreedyReward`: for the quickstart's sort task, the solve rate).
HEADLINE = (("greedy reward (solve rate), val/reward/greedy", ("reward/greedy",), (0, None)),)
PANELS = (("loss", ("loss",), (0, None)),
          ("reward accuracy", ("rewards/accuracies",), (0, 1)),
          ("reward margin (chosen - rejected)", ("rewards/margins",), None),
          ("rewards", ("rewards/chosen", "rewards/rejected"), None),
          ("log-probs of the responses", ("logps/chosen", "logps/rejected"), None))
# Drawn below those when the log has them (online DPO logs the samples' scores, ties and lengths; the module the
# learning rate and gradient norm; training/throughput.py the others).
OPTIONAL_PANELS = (("online: scores of the sampled pairs", ("objective/scores_chosen", "objective/scores_rejected"),
                    None),
                   ("online: share of prompts whose samples tied", ("objective/ties",), (0, 1)),
                   ("online: completion length (tokens)", ("completions/mean_length",), (0, None)),
                   ("learning rate", ("learning_rate",), (0, None)),
                   ("gradient norm (before clipping)", ("grad_norm",), (0, None)),
                   ("tokens per second (all ranks)", ("tokens_per_second",), (0, None)),
                   ("padding fraction", ("padding_fraction",), (0, 1)),
                   ("model FLOPs utilization", ("mfu",), (0, None)))


def find_metrics_csv(path: str | os.PathLike) -> Path:
    """`path` itself if a file, else its `metrics.csv`, else the newest `metrics.csv` below it of a run that
    trained (a `validate` run logs validation alone), else the newest one."""
    path = Path(existing(path, "plot's LOG_DIR", "log"))
    if path.is_file():
        return path
    if (path / "metrics.csv").is_file():
        return path / "metrics.csv"
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise NotFoundError(f"no metrics.csv in {path}: plot reads the CSVLogger's log (the default logger)")
    trained = [p for p in found if any(name.startswith("train/") for name in read_metrics(p))]
    return (trained or found)[-1]


def read_metrics(csv_path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """Each column of a CSVLogger log as (steps, values), skipping the rows where it is empty.

    Example:
        step,train/loss,val/loss        ->  {"train/loss": ([0], [0.69]), "val/loss": ([0, 24], [0.69, 0.6])}
        0,0.69,0.69
        24,,0.6
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            for name, value in row.items():
                if name not in ("step", "epoch") and value:
                    steps, values = series.setdefault(name, ([], []))
                    steps.append(int(row["step"]))
                    values.append(float(value))
    return series


def plot_metrics(source: str | os.PathLike, out_png: str | os.PathLike | None = None, dpi: int = 80):
    """Draw the DPO curves of a run to a PNG, and return the matplotlib `Figure`.

    Each panel shows training values as a thin line and validation values as dots joined by a line;
    chosen is blue, rejected orange.

    Args:
        source: a run's log dir (its `metrics.csv`, or the newest one below it of a run that trained) or
            a `metrics.csv` path.
        out_png: where to write. Default: `metrics.png` beside the `metrics.csv`.
        dpi: resolution of the PNG.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    csv_path = find_metrics_csv(source)
    series = read_metrics(csv_path)
    logged = {name.split("/", 1)[1] for name in series if name.startswith(("train/", "val/"))}
    panels = tuple(p for p in HEADLINE if p[1][0] in logged) + PANELS + tuple(
        p for p in OPTIONAL_PANELS if p[1][0] in logged)
    n_rows = (len(panels) + 1) // 2
    fig = Figure(figsize=(10, 3.25 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, 2, sharex=True).flat  # one step axis: the panels' points line up
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, (title, names, y_range) in zip(axes, panels):
        for color, name in zip(("tab:blue", "tab:orange"), names):
            label = "" if len(names) == 1 else name.split("/")[1] + " "
            if f"train/{name}" in series:
                ax.plot(*series[f"train/{name}"], color=color, linewidth=0.8, alpha=0.6, label=f"{label}train")
            if f"val/{name}" in series:
                ax.plot(*series[f"val/{name}"], "o-", color=color, markersize=3, label=f"{label}val")
        values = [y for line in ax.lines for y in line.get_ydata()]
        if y_range is not None and values and y_range[0] <= min(values) and max(values) <= (y_range[1] or max(values)):
            # Only a range that holds every value (a robust loss can go below 0); an open top above the largest
            # value, so that a constant (a learning rate after warm-up) is a line inside the panel, not its edge.
            ax.set_ylim(y_range[0], y_range[1] if y_range[1] is not None else max(values) * 1.15 or 1)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))  # 3e-4, not 0.00030
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelbottom=True)  # every panel keeps its step labels (sharex hides the upper ones)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title_of(csv_path, series))
    out = Path(out_png) if out_png is not None else csv_path.with_name("metrics.png")
    with atomic_path(out) as partial:  # a reader (a notebook, the docs) never sees half a PNG
        fig.savefig(partial, dpi=dpi, format=out.suffix[1:] or "png")
    return fig


def title_of(csv_path: Path, series: dict[str, tuple[list[int], list[float]]]) -> str:
    """The run's name (e.g. quickstart/version_0) and its headline, first and last validation."""
    parts = [f"{label} {series[name][1][0]:.3g} -> {series[name][1][-1]:.3g}"
             for name, label in (("val/reward/greedy", "greedy reward"), ("val/rewards/accuracies", "val accuracy"))
             if name in series]
    return f"{csv_path.parent.parent.name}/{csv_path.parent.name}" + (f": {', '.join(parts)}" if parts else "")
