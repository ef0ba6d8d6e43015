"""Evaluation report: written by train on its best checkpoint, and by `python -m fmnist_tl.evaluate`."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import fmnist_tl.evaluate as evaluate_module
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.evaluate import evaluate
from fmnist_tl.evaluation.report import compute_report, plot_confusion_matrix, plot_mistakes
from tests.colour_data import CLASS_NAMES as COLOUR_CLASSES
from tests.colour_data import ColourData, colour_images
from tests.helpers import make_entry_cfg, run_cli, tiny_data_overrides

FP32_CPU = ["trainer.accelerator=cpu", "trainer.precision=32-true"]


def eval_cfg(tiny_mirror, tmp_path, *extra: str):
    return make_entry_cfg(
        "evaluate", [*tiny_data_overrides(tiny_mirror, tmp_path), *FP32_CPU, *extra], tmp_path / "eval"
    )


def check_report_consistent(report: dict) -> None:
    """Cross-check the report against its own confusion matrix, computed independently here."""
    counts = torch.tensor(report["confusion_matrix"]["counts"])
    n = report["num_samples"]
    assert int(counts.sum()) == n
    assert abs(report["accuracy"] - float(counts.trace()) / n) < 1e-6
    for i, row in enumerate(report["per_class"]):
        assert row["support"] == int(counts[i].sum())
        assert abs(row["recall"] - float(counts[i, i]) / max(1, int(counts[i].sum()))) < 1e-6
        predicted = int(counts[:, i].sum())
        assert abs(row["precision"] - (float(counts[i, i]) / predicted if predicted else 0.0)) < 1e-6
    assert abs(report["macro_f1"] - sum(r["f1"] for r in report["per_class"]) / len(report["per_class"])) < 1e-6
    names = report["class_names"]
    pairs = report["most_confused"]
    assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
    for p in pairs:
        t, q = names.index(p["true"]), names.index(p["predicted"])
        assert t != q and p["count"] == int(counts[t, q])
    off_diagonal = counts - torch.diag(counts.diagonal())
    if pairs:
        assert pairs[0]["count"] == int(off_diagonal.max())
    shown = report["mistakes_shown"]
    assert len(shown) == min(24, n - int(counts.trace()))
    assert all(m["true"] != m["predicted"] for m in shown)
    assert [m["confidence"] for m in shown] == sorted((m["confidence"] for m in shown), reverse=True)


def test_compute_report_on_hand_made_logits():
    labels = torch.tensor([0, 0, 1, 1, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0]), 3).float()
    report = compute_report(logits, labels, ("a", "b", "c"))
    assert report["accuracy"] == pytest.approx(0.6)
    by_class = {r["class"]: r for r in report["per_class"]}
    assert by_class["a"]["precision"] == pytest.approx(0.5) and by_class["a"]["recall"] == pytest.approx(0.5)
    assert by_class["b"]["precision"] == pytest.approx(2 / 3) and by_class["b"]["f1"] == pytest.approx(0.8)
    assert by_class["c"]["f1"] == 0.0 and by_class["c"]["support"] == 1
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-6)
    assert [(p["true"], p["predicted"], p["count"]) for p in report["most_confused"]] == [("a", "b", 1), ("c", "a", 1)]


@pytest.mark.slow
def test_train_writes_report_matching_what_trainer_test_logged(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    report = json.loads((trained_run / "report.json").read_text())
    assert report["checkpoint"] == metrics["best_model_path"]
    assert abs(report["accuracy"] - metrics["test/acc"]) <= 1e-6
    assert abs(report["macro_f1"] - metrics["test/f1"]) <= 1e-6
    assert report["num_samples"] == 100
    check_report_consistent(report)
    markdown = (trained_run / "report.md").read_text()
    assert f"accuracy **{report['accuracy']:.2%}**" in markdown
    assert all(f"| {name} |" in markdown for name in report["class_names"])
    for png in ("confusion_matrix.png", "mistakes.png"):
        with Image.open(trained_run / png) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 150


@pytest.mark.slow
def test_evaluate_command_matches_trainer_test(trained_run, tiny_mirror, tmp_path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    cfg = eval_cfg(tiny_mirror, tmp_path, f"ckpt_path={metrics['best_model_path']}")
    report = evaluate(cfg)
    # A fresh process-free rebuild from the checkpoint, a fresh Trainer: same numbers as train's test.
    assert abs(report["accuracy"] - metrics["test/acc"]) <= 1e-6
    assert abs(report["macro_f1"] - metrics["test/f1"]) <= 1e-6
    assert report["per_class"] == json.loads((trained_run / "report.json").read_text())["per_class"]
    written = {p.name for p in (tmp_path / "eval").iterdir()}
    assert {"report.json", "report.md", "confusion_matrix.png", "mistakes.png"} <= written
    assert not [p for p in written if p.endswith(".tmp")]


def coloured_share(png: bytes | Image.Image) -> float:
    """Share of a picture's pixels that are clearly coloured (not grey, black or white)."""
    image = png if isinstance(png, Image.Image) else Image.open(io.BytesIO(png))
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return float(((rgb.max(-1) - rgb.min(-1)) > 60).mean())


def test_mistakes_are_shown_in_colour_when_the_images_are_colour_and_grey_otherwise():
    mistakes = [{"true": "a", "predicted": "b", "confidence": 0.9}] * 4
    colour = plot_mistakes(colour_images(4, 0)[0], mistakes, "colour")
    grey = plot_mistakes(colour_images(4, 0)[0][:, :1], mistakes, "grey")  # one channel: (N, 1, H, W)
    assert coloured_share(colour) > 0.05
    assert coloured_share(grey) == 0.0


def test_confusion_matrix_grows_with_the_classes_from_2_to_50():
    widths = []
    for n in (2, 10, 50):
        names = tuple(f"class number {i} with a long folder name" for i in range(n))
        confusion = torch.eye(n, dtype=torch.long) * 5 + 1
        with Image.open(io.BytesIO(plot_confusion_matrix(confusion, names, f"{n} classes"))) as image:
            widths.append(image.width)
    # 10 classes keep today's 8.5 in figure; 2 are not shrunk to nothing, 50 get room for their labels.
    assert 450 < widths[0] < widths[1] < widths[2] and widths[2] > 2 * widths[1]


def test_evaluate_a_colour_model_names_its_classes_and_shows_its_mistakes_in_colour(
    colour_checkpoint, tiny_mirror, tmp_path, monkeypatch
):
    real_build = evaluate_module.build

    def build(cfg, **kwargs):  # cfg.data: the (in-memory) colour data the checkpoint was trained on
        return (
            ColourData()
            if cfg.get("_target_") == "fmnist_tl.data.FashionMNISTDataModule"
            else real_build(cfg, **kwargs)
        )

    monkeypatch.setattr(evaluate_module, "build", build)
    report = evaluate(eval_cfg(tiny_mirror, tmp_path, f"ckpt_path={colour_checkpoint}"))
    assert report["class_names"] == list(COLOUR_CLASSES) and report["num_samples"] == 24
    assert [row["class"] for row in report["per_class"]] == list(COLOUR_CLASSES)
    assert report["input_spec"]["kind"] == "image_folder"
    check_report_consistent(report)
    assert report["mistakes_shown"], "the 2-epoch colour model makes mistakes on its test split"
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in COLOUR_CLASSES)
    with Image.open(tmp_path / "eval" / "mistakes.png") as image:
        assert coloured_share(image) > 0.02


def test_evaluate_a_colour_model_on_fashion_mnist_is_one_line(colour_checkpoint, tiny_mirror, tmp_path):
    with pytest.raises(FmnistError, match=re.escape("the model was trained on 3 classes (red apple, green leaf")):
        evaluate(eval_cfg(tiny_mirror, tmp_path, f"ckpt_path={colour_checkpoint}"))
    assert not (tmp_path / "eval" / "report.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "ckpt_path is required"),
        (["ckpt_path=/no/such.ckpt"], "checkpoint /no/such.ckpt does not exist"),
        (["ckpt_path=x.ckpt", "report.mistakes=-1"], "report.mistakes=-1 must be an integer >= 0"),
        (["+bogus=1"], "unknown config key 'bogus'"),
    ],
)
def test_evaluate_rejects_bad_config(tiny_mirror, tmp_path, extra, message):
    with pytest.raises(FmnistError, match=re.escape(message)):
        evaluate(eval_cfg(tiny_mirror, tmp_path, *extra))


@pytest.mark.slow
def test_evaluate_cli(trained_run, tiny_mirror, tmp_path):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    args = [f"ckpt_path={metrics['best_model_path']}", *tiny_data_overrides(tiny_mirror, tmp_path), *FP32_CPU]
    proc = run_cli(*args, module="fmnist_tl.evaluate")
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(printed["test/acc"] - metrics["test/acc"]) <= 1e-6
    (report_file,) = (tmp_path / "logs" / "evaluate" / "runs").glob("*/report.json")
    assert json.loads(report_file.read_text())["accuracy"] == printed["test/acc"]
