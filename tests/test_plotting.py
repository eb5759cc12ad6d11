import logging
import math
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from lightning_peft.cli.curves import (
    INSTALL_HINT,
    bars_figure,
    curves_figure,
    read_metrics,
    render_bars,
    write_curves,
    write_curves_or_skip,
)

# the shape of Lightning's CSVLogger file: one row per logging call, blanks for metrics not logged then;
# validation rows carry the step of the last training step of their epoch
METRICS = (
    "epoch,step,train_loss,val_acc,val_loss\n"
    "0,4,2.0,,\n0,9,1.5,,\n0,9,,0.950,1.4\n"
    "1,14,1.1,,\n1,19,0.9,,\n1,19,,0.983,1.0\n"
    "2,24,0.8,,\n2,29,0.7,,\n2,29,,0.967,0.9\n"
)
TAB_BLUE = np.array([31, 119, 180]) / 255  # matplotlib's first line colour


@pytest.fixture
def metrics_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS)
    return path


def _panels(figure):
    return {axes.get_title(): axes for axes in figure.axes if axes.get_visible()}


def _line(axes, label):
    (line,) = [line for line in axes.get_lines() if line.get_label() == label]
    return line


def test_losses_share_one_panel_and_each_other_metric_has_its_own(metrics_csv):
    panels = _panels(curves_figure(metrics_csv))
    assert list(panels) == ["loss", "val_acc"]
    assert [t.get_text() for t in panels["loss"].get_legend().get_texts()] == ["train_loss", "val_loss"]
    assert panels["loss"].get_xlabel() == "step"
    assert len(panels["loss"].get_xticks()) >= 3 and len(panels["loss"].get_yticks()) >= 3


def test_train_and_val_loss_are_drawn_at_their_logged_steps_with_their_values(metrics_csv):
    loss = _panels(curves_figure(metrics_csv))["loss"]
    train, val = _line(loss, "train_loss"), _line(loss, "val_loss")
    assert list(train.get_xdata()) == [4, 9, 14, 19, 24, 29]
    assert list(val.get_xdata()) == [9, 19, 29]
    assert set(val.get_xdata()) <= set(train.get_xdata())  # validation lines up with training steps
    assert list(train.get_ydata()) == [2.0, 1.5, 1.1, 0.9, 0.8, 0.7]
    assert list(val.get_ydata()) == [1.4, 1.0, 0.9]


def test_a_small_dip_keeps_its_scale_instead_of_being_stretched_to_the_panel(metrics_csv):
    acc = _panels(curves_figure(metrics_csv))["val_acc"]
    assert list(_line(acc, "val_acc").get_ydata()) == [0.950, 0.983, 0.967]
    low, high = acc.get_ylim()
    # the data's own range plus matplotlib's margins: the 0.983 -> 0.967 dip is a dip, not a fall to 0
    assert 0.94 < low < 0.95 and 0.983 < high < 0.99


def test_all_panels_share_the_step_axis(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train_loss,val_ppl\n0,0,3.0,\n0,50,2.0,\n0,50,,7.5\n0,99,1.0,\n")
    loss, ppl = _panels(curves_figure(csv)).values()
    assert ppl.get_xlim() == loss.get_xlim()
    assert loss.get_xlim()[0] <= 0 and loss.get_xlim()[1] >= 99


def test_epoch_and_task_losses_join_the_loss_panel(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "step,train_loss_step,train_loss_epoch,train_loss/qa,train_acc\n1,1.0,,,0.5\n2,,0.9,0.8,\n"
    )
    panels = _panels(curves_figure(csv))
    assert list(panels) == ["loss", "train_acc"]
    labels = [line.get_label() for line in panels["loss"].get_lines()]
    assert labels == ["train_loss_step", "train_loss_epoch", "train_loss/qa"]


def test_non_finite_values_leave_a_gap_and_finite_ones_keep_their_place(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,train_loss\n1,2.0\n2,nan\n3,inf\n4,1.0\n")
    steps, values = read_metrics(csv)["train_loss"]
    assert steps == [1, 2, 3, 4]
    assert values[0] == 2.0 and math.isnan(values[1]) and math.isnan(values[2]) and values[3] == 1.0
    line = _line(_panels(curves_figure(csv))["loss"], "train_loss")
    assert np.isnan(line.get_ydata()).tolist() == [False, True, True, False]


def test_a_log_without_a_step_column_is_a_clear_error(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,train_loss\n0,1.0\n")
    with pytest.raises(ValueError, match="no 'step' column"):
        curves_figure(csv)


def test_write_curves_writes_a_png_that_reads_back_with_the_lines(metrics_csv, tmp_path):
    png = write_curves(metrics_csv, tmp_path / "out" / "curves.png")
    image = imread(png)
    assert image.shape == (360, 960, 4)  # two panels of 4.8 x 3.6 inches at 100 dpi
    blue = np.abs(image[..., :3] - TAB_BLUE).max(axis=-1) < 0.02
    assert blue.sum() > 200  # the train_loss and val_acc lines
    assert sorted(p.name for p in png.parent.iterdir()) == ["curves.png"]  # no temporary file left


def test_without_matplotlib_curves_are_skipped_with_one_info_line(metrics_csv, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    with caplog.at_level(logging.INFO, logger="lightning_peft.cli.curves"):
        assert write_curves_or_skip(metrics_csv, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "matplotlib is not installed" in record.getMessage() and INSTALL_HINT in record.getMessage()


def test_a_log_with_nothing_to_draw_skips_the_curves_with_one_info_line(tmp_path, caplog):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train_loss\n")  # a run that logged nothing
    with caplog.at_level(logging.INFO, logger="lightning_peft.cli.curves"):
        assert write_curves_or_skip(csv, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
    (record,) = caplog.records
    assert "holds no metric values" in record.getMessage()


def test_bars_are_as_long_as_their_values_labelled_with_a_reference_line():
    figure = bars_figure("T", [("A", [1.0, 2.0]), ("B", [0.5, None])], ["X", "Y"], reference=1.0)
    (axes,) = figure.axes
    x_bars, y_bars = axes.containers
    assert [bar.get_width() for bar in x_bars] == [1.0, 0.5]
    assert [bar.get_width() for bar in y_bars] == [2.0]  # B has no Y value: no bar
    labels = sorted(t.get_text() for t in axes.texts)
    assert labels == ["0.50", "1.00", "2.00"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["A", "B"]
    assert [list(line.get_xdata()) for line in axes.get_lines()] == [[1.0, 1.0]]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["X", "Y"]


def test_bars_refuse_a_group_without_one_value_per_series():
    with pytest.raises(ValueError, match=r"groups \['B'\]"):
        bars_figure("T", [("A", [1.0, 2.0]), ("B", [0.5])], ["X", "Y"])


def test_render_bars_returns_a_png(tmp_path):
    png = tmp_path / "bars.png"
    png.write_bytes(render_bars("T", [("A", [1.0, 2.0])], ["X", "Y"]))
    image = imread(png)
    assert image.shape[1] == 800  # 8 inches at 100 dpi
    assert (np.abs(image[..., :3] - TAB_BLUE).max(axis=-1) < 0.02).sum() > 100  # the X bar


def test_fit_with_early_stopping_stops_keeps_best_adapter_only_checkpoint_and_writes_curves(tmp_path):
    import json
    import subprocess

    import torch

    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_peft.cli.main", "fit", "experiment=tiny_llama_lora",
         "trainer.enable_progress_bar=false", "callbacks=early_stopping", "trainer.max_epochs=6",
         "callbacks.early_stopping.patience=1", "callbacks.early_stopping.min_delta=100",
         f"hydra.run.dir={run}"],
        cwd=tmp_path, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(run / "curves.png").shape[0] > 100
    assert f"wrote {run / 'curves.png'}" in done.stdout + done.stderr
    (best,) = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last-adapter.ckpt"]
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] < 5  # stopped early: no epoch improves val_loss by min_delta=100
    assert all(k.rsplit(".", 1)[-1] in {"lora_A", "lora_B"} for k in ckpt["state_dict"])
    val = [float(r.split(",")[i]) for h, *rows in [(run / "logs/version_0/metrics.csv").read_text().splitlines()]
           for i in [h.split(",").index("val_loss")] for r in rows if r.split(",")[i]]  # fmt: skip
    assert f"val_loss{min(val):.4f}" in best.name
    assert json.loads((run / "metrics.json").read_text())["metrics"]["global_step"] > 0
