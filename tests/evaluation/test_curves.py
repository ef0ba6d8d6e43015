"""curves.png: train/val loss and accuracy per epoch from a run's CSV log, in the evaluation report."""

from __future__ import annotations

import csv
import logging
import shutil

import pytest
import torch
from PIL import Image

from fmnist_tl.evaluate import evaluate
from fmnist_tl.evaluation import curves
from tests.helpers import make_entry_cfg, tiny_data_overrides

# The layout Lightning's CSVLogger writes: LR-monitor rows without an epoch, the epoch's step loss,
# val and train metrics on separate rows, and the test row after the last epoch.
LIGHTNING_CSV = """epoch,lr-AdamW/head,step,test/acc,train/acc,train/loss_epoch,train/loss_step,val/acc,val/loss
,0.001,0,,,,,,
0,,9,,,,2.31,,
0,,9,,,,,0.45,2.10
0,,9,,0.24,2.23,,,
,0.0005,10,,,,,,
1,,19,,,,,0.90,1.69
1,,19,,0.59,1.88,,,
2,,20,1.0,,,,,
"""


def test_read_curves_gathers_each_epoch_from_lightning_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(LIGHTNING_CSV)
    assert curves.read_curves(path) == {
        "train/loss_epoch": [(0, 2.23), (1, 1.88)],
        "val/loss": [(0, 2.10), (1, 1.69)],
        "train/acc": [(0, 0.24), (1, 0.59)],
        "val/acc": [(0, 0.45), (1, 0.90)],
    }


def _column(csv_path, name):
    """The per-epoch values of one column, read here with the csv module alone."""
    with open(csv_path, newline="") as f:
        return [(int(r["epoch"]), float(r[name])) for r in csv.DictReader(f) if r["epoch"] and r.get(name)]


@pytest.mark.slow
def test_train_report_has_curves_from_the_csv_log(trained_run):
    png = trained_run / "curves.png"
    assert png.is_file() and Image.open(png).size[0] > 300
    assert "![training curves](curves.png)" in (trained_run / "report.md").read_text()
    log_file = trained_run / "csv" / "metrics.csv"
    data = curves.read_curves(log_file)
    for name in ("val/acc", "val/loss", "train/acc", "train/loss_epoch"):
        assert data[name] == _column(log_file, name) and [e for e, _ in data[name]] == [0, 1]


@pytest.mark.slow
def test_evaluate_plots_the_checkpoint_runs_csv_with_its_finetune_start(
    trained_run, tiny_mirror, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = next((run / "checkpoints").glob("epoch_*.ckpt"))
    # As if the run had fine-tuned from its second epoch: the marker comes from the model the
    # checkpoint holds (its model.finetune), not from a config file beside it.
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"]["finetune"]["start_epoch"] = 1
    torch.save(saved, ckpt)
    plotted = {}

    def spy(data, finetune_start, title):
        plotted.update(data=data, start=finetune_start)
        return real(data, finetune_start, title)

    real = curves.plot_curves
    monkeypatch.setattr(curves, "plot_curves", spy)
    cfg = make_entry_cfg(
        "evaluate",
        [
            *tiny_data_overrides(tiny_mirror, tmp_path),
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            f"ckpt_path={ckpt}",
        ],
        tmp_path / "eval",
    )
    report = evaluate(cfg)
    assert report["curves"] == "curves.png" and (tmp_path / "eval" / "curves.png").is_file()
    assert plotted["start"] == 1
    assert plotted["data"]["val/acc"] == _column(run / "csv" / "metrics.csv", "val/acc")


def test_missing_csv_log_means_no_curves_and_one_line(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fmnist_tl.evaluation.curves"):
        assert curves.write_curves(tmp_path, tmp_path, None) is None
    assert not (tmp_path / "curves.png").exists()
    assert [r.getMessage() for r in caplog.records if "no curves.png" in r.getMessage()]


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_epoch_ticks_are_whole_epochs_also_for_one_or_two(epochs):
    points = [(e, 0.5 + e / 10) for e in range(epochs)]
    fig = curves.curves_figure({"val/acc": points, "val/loss": points}, None, "t")
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks == [float(e) for e in range(1, epochs + 1)], ticks


def test_lineage_cuts_each_earlier_log_at_the_resumed_epoch_and_later_runs_win(tmp_path):
    """Run a went on to epoch 2 (0-based) after its epoch-0 checkpoint that b resumed; b re-ran epoch 1."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("epoch,val/acc\n0,0.1\n1,0.2\n2,0.3\n")
    b.write_text("epoch,val/acc\n1,0.5\n2,0.6\n")
    data, runs = curves.lineage_curves([{"csv": str(a), "until_epoch": 0}, {"csv": str(b)}])
    assert data == {"val/acc": [(0, 0.1), (1, 0.5), (2, 0.6)]} and runs == 2
    # A log that is gone leaves its epochs out, with one line, and the rest is plotted.
    data, runs = curves.lineage_curves([{"csv": str(tmp_path / "gone.csv"), "until_epoch": 0}, {"csv": str(b)}])
    assert data == {"val/acc": [(1, 0.5), (2, 0.6)]} and runs == 1


def test_resumed_run_and_its_checkpoint_plot_the_whole_run(tiny_cfg, tiny_mirror, tmp_path, monkeypatch):
    """curves.png of a run resumed for a 2nd epoch, and evaluate of the checkpoint it wrote (into the first
    run's checkpoints/), show both epochs: the first run's log, then the resumed run's."""
    from fmnist_tl.train import train

    train(tiny_cfg(output="a"))
    plotted = []
    real = curves.plot_curves

    def spy(data, finetune_start, title):
        plotted.append((data, title))
        return real(data, finetune_start, title)

    monkeypatch.setattr(curves, "plot_curves", spy)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train(tiny_cfg("trainer.max_epochs=2", f"ckpt_path={last}", output="b"))
    a_csv, b_csv = tmp_path / "a" / "csv" / "metrics.csv", tmp_path / "b" / "csv" / "metrics.csv"
    whole = {name: [*_column(a_csv, name)[:1], *_column(b_csv, name)] for name in ("val/acc", "train/acc")}
    assert [e for e, _ in whole["val/acc"]] == [0, 1]
    data, title = plotted[-1]
    assert {name: data[name] for name in whole} == whole and title == "Training curves of b (2 epochs, in 2 runs)"
    cfg = make_entry_cfg(
        "evaluate",
        [
            *tiny_data_overrides(tiny_mirror, tmp_path),
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            f"ckpt_path={last}",
        ],
        tmp_path / "eval",
    )
    evaluate(cfg)
    data, title = plotted[-1]
    assert {name: data[name] for name in whole} == whole and title == "Training curves of b (2 epochs, in 2 runs)"
