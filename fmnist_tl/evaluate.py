"""Evaluation report for a checkpoint: `python -m fmnist_tl.evaluate ckpt_path=<ckpt> [hydra overrides]`.

Tests the checkpoint on one device and writes fmnist_tl/evaluation/report.py's report into the run directory,
from the logits `trainer.test` itself produced (`train` writes the same report for its best checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from fmnist_tl.config import CONFIG_PATH, check_config
from fmnist_tl.core import EpochProgressBar, FmnistError
from fmnist_tl.evaluation import run_dir_of_checkpoint, write_report
from fmnist_tl.runtime import build, check_accelerator, cpu_precision_probe, run_hydra_cli, task_wrapper
from fmnist_tl.training import RecordTestOutputs, TransferClassifier, resolve_precision

log = logging.getLogger(__name__)


def _check_config(cfg: DictConfig) -> str:
    check_config(cfg)
    check_accelerator(cfg.trainer)
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        raise FmnistError("ckpt_path is required: python -m fmnist_tl.evaluate ckpt_path=PATH/TO/checkpoint.ckpt")
    return str(ckpt)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Rebuild the model from the checkpoint, test it on the test split, write the report files."""
    ckpt = _check_config(cfg)
    model = TransferClassifier.from_checkpoint(ckpt)
    # The datamodule runs the model's own preprocessing (from the checkpoint) on its batches.
    datamodule = build(cfg.data)
    # The backbone runs in this trainer (from images): auto precision is measured on a CPU.
    precision = resolve_precision(cfg.trainer, cpu_precision_probe(cfg, model))
    collector = RecordTestOutputs()
    # One device: a DistributedSampler would pad the test set and the numbers would drift.
    trainer: L.Trainer = build(
        cfg.trainer,
        devices=1,
        num_nodes=1,
        strategy="auto",
        precision=precision,
        logger=False,
        callbacks=[collector, EpochProgressBar()],  # its speed column also times a one-batch test
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    (logged,) = trainer.test(model, datamodule=datamodule, verbose=False, weights_only=True)
    # curves.png comes from the CSV log of the run that wrote the checkpoint, and its saved config.
    run_dir = run_dir_of_checkpoint(ckpt)
    if run_dir is None and not model.history.logs():
        log.info("no curves.png: %s is not in a run's checkpoints/ folder, so its CSV log is unknown", ckpt)
    return write_report(
        collector,
        datamodule,
        model,
        ckpt,
        cfg.paths.output_dir,
        logged,
        precision,
        top_pairs=cfg.report.top_pairs,
        num_mistakes=cfg.report.mistakes,
        run_dir=run_dir,
        finetune_start=model.finetune_start,  # from the checkpoint's own model.finetune
    )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with task_wrapper(hydra_run=True):
        report = evaluate(cfg)
    summary = {"test/acc": report["accuracy"], "test/f1": report["macro_f1"], "num_samples": report["num_samples"]}
    print(json.dumps({**summary, "report": str(Path(cfg.paths.output_dir) / "report.md")}))


if __name__ == "__main__":
    run_hydra_cli(main, "evaluate")
