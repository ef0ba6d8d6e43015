"""The evaluation report of a test run: report.json/md, confusion_matrix.png, mistakes.png, curves.png.

Computed from the logits and labels `trainer.test` produced (a callback on the model's head records
them) with the torchmetrics classes Lightning logged test/acc and test/f1 with, so the numbers agree.
`evaluate` (any checkpoint) and `train` (its best one) both write it; docs/evaluation.md describes each file.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from matplotlib.figure import Figure
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from fmnist_tl.core import atomic_write_bytes, atomic_write_json, atomic_write_text
from fmnist_tl.evaluation.curves import png_bytes, write_curves
from fmnist_tl.training import RecordTestOutputs, TransferClassifier

log = logging.getLogger(__name__)

# The report must agree with what trainer.test logged for the same logits.
AGREEMENT_TOLERANCE = 1e-6


def compute_report(logits: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...], top_pairs: int = 5):
    """Metrics from logits with torchmetrics (the same classes the model logs test/acc and test/f1 with)."""
    n = len(class_names)
    metrics = MetricCollection(
        {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "macro_f1": MulticlassF1Score(n, average="macro"),
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
            "f1": MulticlassF1Score(n, average=None),
            "confusion": MulticlassConfusionMatrix(n),
        }
    )
    values = metrics(logits, labels)
    confusion = values["confusion"].long()
    support = confusion.sum(1)
    per_class = [
        {"class": name, **{k: float(values[k][i]) for k in ("precision", "recall", "f1")}, "support": int(support[i])}
        for i, name in enumerate(class_names)
    ]
    off_diagonal = [
        (int(confusion[t, p]), t, p) for t in range(n) for p in range(n) if t != p and int(confusion[t, p]) > 0
    ]
    off_diagonal.sort(key=lambda c: (-c[0], c[1], c[2]))
    most_confused = [
        {
            "true": class_names[t],
            "predicted": class_names[p],
            "count": count,
            "share_of_true_class": count / max(1, int(support[t])),
        }
        for count, t, p in off_diagonal[:top_pairs]
    ]
    return {
        "num_samples": len(labels),
        "accuracy": float(values["accuracy"]),
        "macro_f1": float(values["macro_f1"]),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "per_class": per_class,
        "most_confused": most_confused,
        "confusion_matrix": {"rows": "true class", "columns": "predicted class", "counts": confusion.tolist()},
        "class_names": list(class_names),
    }


# Longer class names are shortened on the plots (report.json and report.md keep them whole).
PLOT_NAME_CHARS = 24
# Above this many classes the cells are too small for their shares to be printed in them.
ANNOTATED_CLASSES = 30


def short_name(name: str, limit: int = PLOT_NAME_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def plot_confusion_matrix(confusion: torch.Tensor, class_names: tuple[str, ...], title: str) -> bytes:
    """Rows normalised; the figure grows with the classes (8.5 x 7.5 in for 10) and the text shrinks, so
    that 2 to 50 classes stay readable."""
    counts = confusion.double()
    normalised = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(class_names)
    side = min(26.0, max(5.5, 2.5 + 0.6 * n))
    fig = Figure(figsize=(side, side - 1.0))
    ax = fig.add_subplot()
    image = ax.imshow(normalised.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    names = [short_name(c) for c in class_names]
    tick_size = 10 if n <= 15 else max(7.0, 10 * 15 / n)
    ax.set_xticks(range(n), names, rotation=40 if n <= 20 else 90, ha="right" if n <= 20 else "center")
    ax.set_yticks(range(n), names)
    ax.tick_params(labelsize=tick_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    if n <= ANNOTATED_CLASSES:
        text_size = 8 if n <= 12 else max(5.0, 8 * 12 / n)
        for t in range(n):
            for p in range(n):
                value = float(normalised[t, p])
                if value >= 0.005:
                    color = "white" if value > 0.5 else "black"
                    ax.text(p, t, f"{value:.2f}", ha="center", va="center", fontsize=text_size, color=color)
    return png_bytes(fig)


def as_picture(image: torch.Tensor) -> tuple[Any, str | None]:
    """uint8 (C, H, W) -> what imshow takes, and its colour map: RGB as it is, one channel in grey."""
    if image.shape[0] == 3:
        return image.permute(1, 2, 0).numpy(), None
    return image[0].numpy(), "gray"


def plot_mistakes(images: torch.Tensor, mistakes: list[dict[str, Any]], title: str, columns: int = 8) -> bytes:
    """Grid of uint8 (C, H, W) images, in colour when they have 3 channels, each titled with its mistake's
    true and predicted class and confidence."""
    count = len(mistakes)
    rows = max(1, math.ceil(count / columns))
    fig = Figure(figsize=(columns * 1.7, rows * 1.8 + 0.5))
    fig.suptitle(title)
    if count == 0:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no wrong predictions", ha="center", va="center")
    for i, m in enumerate(mistakes):
        ax = fig.add_subplot(rows, columns, i + 1)
        picture, cmap = as_picture(images[i])
        ax.imshow(picture, cmap=cmap, vmin=0, vmax=255)
        label = f"true: {short_name(m['true'], 12)}\npred: {short_name(m['predicted'], 12)} {m['confidence']:.1%}"
        ax.set_title(label, fontsize=7.5)
        ax.axis("off")
    return png_bytes(fig)


def images_of_test_split(datamodule: L.LightningDataModule, labels: torch.Tensor) -> torch.Tensor:
    """The uint8 test images behind the collected outputs (the test loader is never shuffled), as the
    datamodule holds them: indexed, not copied, so a split kept on disk reads only the mistakes shown."""
    splits = getattr(datamodule, "image_splits", None)
    if not splits or "test" not in splits or splits["test"][0].dtype != torch.uint8:
        raise RuntimeError("the datamodule holds no uint8 test images (call setup first)")
    images, split_labels = splits["test"]
    if len(labels) > len(split_labels) or not torch.equal(split_labels[: len(labels)].long(), labels.long()):
        raise RuntimeError("test outputs do not line up with the datamodule's test split")
    return images


def markdown_report(report: dict[str, Any], plots: bool = True) -> str:
    lines = [
        "# Evaluation report",
        "",
        f"Checkpoint: `{report['checkpoint']}`  ",
        f"Backbone {report['backbone']} at {report['image_size']} px, precision {report['precision']}  ",
        f"Test images: {report['num_samples']} · accuracy **{report['accuracy']:.2%}** · "
        f"macro-F1 **{report['macro_f1']:.4f}** · loss {report['loss']:.4f}",
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["per_class"]:
        lines.append(
            f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |"
        )
    rows = report["per_class"]
    macro = {k: sum(r[k] for r in rows) / len(rows) for k in ("precision", "recall", "f1")}
    lines.append(
        f"| **macro avg** | {macro['precision']:.4f} | {macro['recall']:.4f} | {macro['f1']:.4f} | "
        f"{sum(r['support'] for r in rows)} |"
    )
    lines += ["", "## Most confused pairs", ""]
    if report["most_confused"]:
        lines += ["| true class | predicted as | count | share of true class |", "| --- | --- | ---: | ---: |"]
        for pair in report["most_confused"]:
            lines.append(
                f"| {pair['true']} | {pair['predicted']} | {pair['count']} | {pair['share_of_true_class']:.1%} |"
            )
    else:
        lines.append("No wrong predictions.")
    if plots:
        lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![most confident mistakes](mistakes.png)"]
        if report.get("curves"):
            lines += ["", "## Training curves", "", f"![training curves]({report['curves']})"]
    else:
        lines += [
            "",
            "No plots (report.plots=false); draw them with: "
            f"python -m fmnist_tl.evaluate ckpt_path={report['checkpoint']}",
        ]
    return "\n".join([*lines, ""])


def write_report(
    collector: RecordTestOutputs,
    datamodule: L.LightningDataModule,
    model: TransferClassifier,
    checkpoint: str,
    output_dir: str | Path,
    logged: dict[str, float | None],
    precision: str,
    top_pairs: int = 5,
    num_mistakes: int = 24,
    plots: bool = True,
    run_dir: str | Path | None = None,
    finetune_start: int | None = None,
) -> dict[str, Any]:
    """Turn what `trainer.test` just ran into report.json, report.md and (with `plots`) the PNGs in output_dir.

    `run_dir`: the training run the checkpoint came from; the model's `curve_logs` (the CSV logs of a
    run and of the runs it resumed) or else run_dir's CSV log give curves.png, with the fine-tune
    phase marked from `finetune_start` (0-based epoch, None: no fine-tune phase).
    """
    logits, labels = collector.result()
    # The checkpoint's names (trainer.test checked them against the datamodule's in the model's setup).
    class_names = model.class_names
    report = {
        "checkpoint": str(checkpoint),
        "split": "test",
        "backbone": model.hparams.backbone,
        "image_size": model.hparams.image_size,
        "input_spec": model.input_spec,
        "weights_id": model.weights_id,
        "precision": precision,
        **compute_report(logits, labels, class_names, top_pairs),
    }
    # Same logits, same torchmetrics classes: a mismatch here is a bug, not a user error.
    for ours, theirs in (("accuracy", "test/acc"), ("macro_f1", "test/f1")):
        if logged.get(theirs) is not None and abs(report[ours] - float(logged[theirs])) > AGREEMENT_TOLERANCE:
            raise RuntimeError(f"report {ours}={report[ours]} differs from trainer.test {theirs}={logged[theirs]}")

    images = images_of_test_split(datamodule, labels)
    confidence, predicted = logits.softmax(-1).max(-1)
    wrong = (predicted != labels).nonzero().squeeze(1)
    worst = wrong[confidence[wrong].argsort(descending=True, stable=True)][:num_mistakes]
    mistakes = [
        {
            "index": int(i),
            "true": class_names[int(labels[i])],
            "predicted": class_names[int(predicted[i])],
            "confidence": float(confidence[i]),
        }
        for i in worst
    ]

    output_dir = Path(output_dir)
    if plots:  # matplotlib: a second or more per report, which a sweep's trials skip
        confusion = torch.tensor(report["confusion_matrix"]["counts"])
        title = f"Confusion matrix, rows normalised (accuracy {report['accuracy']:.2%}, n={report['num_samples']})"
        atomic_write_bytes(output_dir / "confusion_matrix.png", plot_confusion_matrix(confusion, class_names, title))
        title = f"Most confident wrong predictions ({len(worst)} of {len(wrong)} mistakes)"
        shown = images[worst] if len(worst) else torch.empty(0, dtype=torch.uint8)  # rows read: the ones shown
        atomic_write_bytes(output_dir / "mistakes.png", plot_mistakes(shown, mistakes, title))
        # The model's own lineage when it has one (checkpoints record it), else run_dir's CSV log.
        logs = model.history.logs(collector.trainer)
        curves = write_curves(run_dir, output_dir, finetune_start, logs) if run_dir is not None or logs else None
        report["curves"] = curves.name if curves else None
    report["mistakes_shown"] = mistakes
    atomic_write_json(output_dir / "report.json", report)
    atomic_write_text(output_dir / "report.md", markdown_report(report, plots))
    log.info(
        "test accuracy %.4f, macro-F1 %.4f -> %s", report["accuracy"], report["macro_f1"], output_dir / "report.md"
    )
    return report
