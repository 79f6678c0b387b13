"""`dpo-lightning plot`: a CSVLogger `metrics.csv` (written here by hand, in Lightning's layout) to a PNG.

Checks the columns reach the right panels as train and val curves, that a log dir with several versions
plots the newest that trained (not a later `validate`), and that a panel with a natural range keeps it.
No training, no network.
"""

import multiprocessing
import os
import signal
import time

from matplotlib.figure import Figure

from dpo_lightning.cli.main import main
from dpo_lightning.tools.plots import plot_metrics, read_metrics

# Lightning's CSVLogger layout: one row per logging call, empty cells for metrics not logged then.
METRICS_CSV = """epoch,step,train/loss,train/rewards/accuracies,val/rewards/accuracies,val/rewards/margins
,0,,,0.5,0.0
0,9,0.69,0.5,,
0,19,0.6,0.75,,
0,24,,,0.9,0.4
"""


def write_run(folder, text=METRICS_CSV):
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text(text)
    return folder


def test_read_metrics_keeps_each_column_at_its_own_steps(tmp_path):
    series = read_metrics(write_run(tmp_path / "run") / "metrics.csv")
    assert series["val/rewards/accuracies"] == ([0, 24], [0.5, 0.9])
    assert series["train/rewards/accuracies"] == ([9, 19], [0.5, 0.75])
    assert "epoch" not in series and "step" not in series


def panels(figure) -> dict:
    """Each visible panel's title -> {line label: (steps, values)}."""
    return {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
            for ax in figure.axes if ax.get_visible()}


def test_plot_draws_train_and_val_per_panel(tmp_path):
    figure = plot_metrics(write_run(tmp_path / "run"), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = panels(figure)
    assert drawn["reward accuracy"] == {"train": ([9, 19], [0.5, 0.75]), "val": ([0, 24], [0.5, 0.9])}
    assert drawn["loss"] == {"train": ([9, 19], [0.69, 0.6])}


def test_plot_command_picks_the_newest_run_of_a_log_dir(tmp_path, capsys):
    old = write_run(tmp_path / "runs" / "version_0")
    new = write_run(tmp_path / "runs" / "version_1")
    os.utime(old / "metrics.csv", (1, 1))  # older mtime
    main(["plot", str(tmp_path / "runs")])
    assert (new / "metrics.png").exists() and not (old / "metrics.png").exists()
    assert str(new / "metrics.png") in capsys.readouterr().out


def test_plot_command_skips_a_newer_validate_run_and_says_which_it_took(tmp_path, capsys):
    # `dpo-lightning validate` after training writes version_1 with one validation row and no training.
    trained = write_run(tmp_path / "runs" / "version_0")
    validated = write_run(tmp_path / "runs" / "version_1",
                          "epoch,step,val/loss,val/rewards/accuracies\n0,299,0.2,1.0\n")
    os.utime(trained / "metrics.csv", (1, 1))
    main(["plot", str(tmp_path / "runs")])
    assert (trained / "metrics.png").exists() and not (validated / "metrics.png").exists()
    assert f"from {trained / 'metrics.csv'}" in capsys.readouterr().out


def with_columns(text: str, values: dict[str, float]) -> str:
    """METRICS_CSV plus training columns, filled on the step-9 row and empty elsewhere."""
    lines = text.splitlines()
    lines[0] += "".join(f",train/{name}" for name in values)
    for i, line in enumerate(lines[1:], start=1):
        lines[i] += "".join(f",{v}" if line.startswith("0,9,") else "," for v in values.values())
    return "\n".join(lines) + "\n"


def test_plot_adds_the_learning_rate_and_throughput_panels_when_the_log_has_them(tmp_path):
    text = with_columns(METRICS_CSV, {"learning_rate": 5e-5, "grad_norm": 2.5, "tokens_per_second": 1500.0,
                                      "padding_fraction": 0.25})
    drawn = panels(plot_metrics(write_run(tmp_path / "run", text), tmp_path / "curves.png"))
    assert list(drawn)[5:] == ["learning rate", "gradient norm (before clipping)", "tokens per second (all ranks)",
                               "padding fraction"]
    assert drawn["learning rate"] == {"train": ([9], [5e-5])}
    assert drawn["tokens per second (all ranks)"] == {"train": ([9], [1500.0])}  # no MFU on CPU: no empty panel
    assert list(panels(plot_metrics(write_run(tmp_path / "plain"), tmp_path / "plain.png"))) == [
        "loss", "reward accuracy", "reward margin (chosen - rejected)", "rewards", "log-probs of the responses"]


def test_the_headline_panel_comes_first_and_the_title_says_it(tmp_path):
    # The quickstart's headline (the greedy solve rate) was in no panel and no title.
    text = ("epoch,step,train/loss,train/rewards/accuracies,val/rewards/accuracies,val/rewards/margins,val/reward/greedy\n"
            ",0,,,0.5,0.0,0.035\n0,9,0.69,0.5,,,\n0,19,0.6,0.75,,,\n0,24,,,0.9,0.4,0.77\n")
    figure = plot_metrics(write_run(tmp_path / "run", text), tmp_path / "curves.png")
    drawn = panels(figure)
    assert list(drawn)[0] == "greedy reward (solve rate), val/reward/greedy"
    assert drawn["greedy reward (solve rate), val/reward/greedy"] == {"val": ([0, 24], [0.035, 0.77])}
    assert figure.get_suptitle().endswith("/run: greedy reward 0.035 -> 0.77, val accuracy 0.5 -> 0.9")


def test_online_runs_get_their_panels(tmp_path):
    text = with_columns(METRICS_CSV, {"objective/scores_chosen": 0.8, "objective/scores_rejected": 0.2,
                                      "objective/ties": 0.1, "completions/mean_length": 7.0})
    drawn = panels(plot_metrics(write_run(tmp_path / "run", text), tmp_path / "curves.png"))
    assert drawn["online: scores of the sampled pairs"] == {"scores_chosen train": ([9], [0.8]),
                                                            "scores_rejected train": ([9], [0.2])}
    assert drawn["online: share of prompts whose samples tied"] == {"train": ([9], [0.1])}
    assert drawn["online: completion length (tokens)"] == {"train": ([9], [7.0])}


def test_a_constant_learning_rate_is_a_line_inside_its_panel_with_short_labels(tmp_path):
    # After warm-up the rate is constant: it ran along the panel's top edge, under labels like 0.00030.
    text = "epoch,step,train/loss,train/learning_rate\n" + "".join(f"0,{s},0.6,0.0003\n" for s in range(0, 50, 5))
    figure = plot_metrics(write_run(tmp_path / "run", text), tmp_path / "curves.png")
    (ax,) = [ax for ax in figure.axes if ax.get_title() == "learning rate"]
    bottom, top = ax.get_ylim()
    assert bottom == 0 and top > 0.0003 * 1.1
    labels = [label.get_text() for label in ax.get_yticklabels() if label.get_text()]
    assert labels and max(len(label) for label in labels) <= 4 and ax.yaxis.get_offset_text().get_text() == "1e\u22124"


def test_a_fraction_that_barely_moves_is_drawn_on_its_whole_range(tmp_path):
    # Autoscaled, a padding fraction between 0.19 and 0.22 fills the panel and looks like a trend.
    text = "epoch,step,train/loss,train/rewards/accuracies,train/padding_fraction\n"
    text += "".join(f"0,{s},0.6{s % 10},0.5{s % 7},{0.19 + 0.03 * (s % 3) / 2}\n" for s in range(0, 50, 5))
    figure = plot_metrics(write_run(tmp_path / "run", text), tmp_path / "curves.png")
    ylim = {ax.get_title(): ax.get_ylim() for ax in figure.axes}
    assert ylim["padding fraction"] == (0, 1) and ylim["reward accuracy"] == (0, 1)
    assert ylim["loss"][0] == 0


def _plot_and_hang_mid_write(run, out, marker) -> None:
    """Plot, stopping for good after the PNG's first bytes are written (as a slow disk or a kill would)."""
    def half_written(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG")
        open(marker, "w").close()
        time.sleep(600)

    Figure.savefig = half_written
    plot_metrics(run, out)


def test_a_plot_killed_mid_write_leaves_the_earlier_png_whole(tmp_path):
    # Before: the PNG was written in place, so a kill left its first bytes over the earlier picture.
    run, out, marker = write_run(tmp_path / "run"), tmp_path / "curves.png", tmp_path / "writing"
    plot_metrics(run, out)
    earlier = out.read_bytes()
    writer = multiprocessing.get_context("fork").Process(target=_plot_and_hang_mid_write, args=(run, out, marker))
    writer.start()
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert writer.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(timeout=60)
    assert out.read_bytes() == earlier
