"""`dpo-lightning plot`: a CSVLogger `metrics.csv` (written here by hand, in Lightning's layout) to a PNG.

Checks the columns reach the right panels as train and val curves, and that a log dir with several
versions plots the newest. No training, no network.
"""

import os

from dpo_lightning.cli import main
from dpo_lightning.plots import plot_metrics, read_metrics

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


def test_plot_draws_train_and_val_per_panel(tmp_path):
    figure = plot_metrics(write_run(tmp_path / "run"), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    accuracy = figure.axes[0]
    assert accuracy.get_title() == "reward accuracy"
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in accuracy.lines}
    assert lines == {"train": ([9, 19], [0.5, 0.75]), "val": ([0, 24], [0.5, 0.9])}


def test_plot_command_picks_the_newest_run_of_a_log_dir(tmp_path, capsys):
    old = write_run(tmp_path / "runs" / "version_0")
    new = write_run(tmp_path / "runs" / "version_1")
    os.utime(old / "metrics.csv", (1, 1))  # older mtime
    main(["plot", str(tmp_path / "runs")])
    assert (new / "metrics.png").exists() and not (old / "metrics.png").exists()
    assert str(new / "metrics.png") in capsys.readouterr().out


def test_plot_adds_the_throughput_panels_when_the_log_has_them(tmp_path):
    with_throughput = METRICS_CSV.replace("val/rewards/margins\n", "val/rewards/margins,train/tokens_per_second,"
                                          "train/padding_fraction\n", 1)
    lines = with_throughput.splitlines()
    lines = [lines[0]] + [line + (",1500.0,0.25" if line.startswith("0,9,") else ",,") for line in lines[1:]]
    figure = plot_metrics(write_run(tmp_path / "run", "\n".join(lines) + "\n"), tmp_path / "curves.png")
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible[4:]] == ["tokens per second (all ranks)", "padding fraction"]
    assert [(list(l.get_xdata()), list(l.get_ydata())) for l in visible[4].lines] == [([9], [1500.0])]
    assert len(figure.axes) == 6 and len(visible) == 6  # no MFU on CPU: no empty MFU panel
    assert len(plot_metrics(write_run(tmp_path / "plain"), tmp_path / "plain.png").axes) == 4
