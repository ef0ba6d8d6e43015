"""Evaluation report: written by train on its best checkpoint, and by `python -m fmnist_tl.evaluate`."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from fmnist_tl.core.errors import FmnistError
from fmnist_tl.evaluate import evaluate
from fmnist_tl.evaluation.report import compute_report
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
