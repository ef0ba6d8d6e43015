"""What a run leaves in its run dir: a clean start, the tested checkpoint's report, metrics.json."""

from __future__ import annotations

import logging
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from fmnist_tl.core import atomic_write_json, atomic_write_text
from fmnist_tl.evaluation import write_report
from fmnist_tl.runtime.checks import config_hash
from fmnist_tl.sweeps import write_summary
from fmnist_tl.training import ModelCheckpoint, RecordTestOutputs, TransferClassifier

log = logging.getLogger(__name__)

# Run-dir entries that are this run's own before it starts: Hydra's record and log, earlier runs set aside.
_RUN_OWN = (".hydra", "previous-")


@rank_zero_only  # DDP's other ranks start later, into the same run dir: never move rank 0's files
def set_aside_previous_run(output_dir: Path, ckpt_path: str | None) -> None:
    """Move an earlier run's files in this run dir (hydra.run.dir=X twice) into X/previous-<time>/.

    A fresh run then never sits beside another run's checkpoints and curves. A run that resumes
    from a checkpoint in this dir continues it instead.
    """
    if not output_dir.is_dir() or (ckpt_path and output_dir.resolve() in Path(ckpt_path).resolve().parents):
        return
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    log_path = (
        OmegaConf.select(hydra_cfg, "job_logging.handlers.file.filename", throw_on_resolution_failure=False)
        if hydra_cfg
        else None
    )
    log_file = Path(log_path).name if log_path else ""
    earlier = [p for p in output_dir.iterdir() if not p.name.startswith(_RUN_OWN) and p.name != log_file]
    if not earlier:
        return
    aside = output_dir / f"previous-{datetime.now():%Y-%m-%d_%H-%M-%S_%f}"
    aside.mkdir()
    for p in earlier:
        shutil.move(p, aside / p.name)
    log.warning("%s held an earlier run: moved it to %s (resume one with ckpt_path=...)", output_dir, aside)


def run_test(
    cfg: DictConfig, trainer: L.Trainer, model: TransferClassifier, datamodule: L.LightningDataModule, precision: str
) -> tuple[str, dict[str, float | None]]:
    """Test the best checkpoint (or the final weights) and write its report; (tested path, test metrics)."""
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.checkpoint_to_test() if isinstance(checkpoint, ModelCheckpoint) else ""
    if not cfg.get("test"):
        return best, {}
    use_best = bool(best) and not trainer.fast_dev_run
    # The recorder keeps the test logits, so the report costs no second pass over the test set.
    recorder = RecordTestOutputs()
    trainer.callbacks.append(recorder)
    # Private class: Lightning has no public way to ask whether test runs in new processes (ddp_spawn);
    # tests/training/test_train.py fails when it moves.
    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        # There, Lightning's CSVLogger starts a new writer that deletes the fit's csv/metrics.csv (with
        # a warning). The test metrics go to metrics.json and the report.
        trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]
    trainer.test(model, datamodule=datamodule, ckpt_path=best if use_best else None, weights_only=True)
    test = {k: _metric(trainer, k) for k in ("test/acc", "test/f1", "test/loss")}
    output_dir = Path(cfg.paths.output_dir)
    if trainer.world_size == 1 and not trainer.fast_dev_run:
        tested = best if use_best else "the final weights of this run (no checkpoint saved)"
        plots = bool(OmegaConf.select(cfg, "report.plots", default=True))
        start = model.finetune.first_epoch
        write_report(
            recorder,
            datamodule,
            model,
            tested,
            output_dir,
            test,
            precision,
            plots=plots,
            run_dir=output_dir,
            finetune_start=start,
        )
    elif use_best and trainer.is_global_zero:
        log.info(
            "no automatic report under %d processes; run: python -m fmnist_tl.evaluate ckpt_path=%s",
            trainer.world_size,
            best,
        )
    return best, test


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def run_metrics(
    cfg: DictConfig,
    trainer: L.Trainer,
    model: TransferClassifier,
    test: dict[str, float | None],
    tested: str,
    precision: str,
    feature_cache: Any,
    started: float,
    resumed_from: str | None,
    progress: tuple[int, int],
    pruned_at_epoch: int | None = None,
) -> dict[str, Any]:
    """metrics.json's record of a completed run (or of a sweep trial its pruner stopped after
    `pruned_at_epoch`), with the best checkpoint's validation figures. `progress`: the fit's
    (epochs, global_step), `fit_progress` read before the test resets the trainer's metrics."""
    epochs, global_step = progress
    val = {k: _metric(trainer, k) for k in ("val/acc", "val/f1", "val/loss")}
    if isinstance(trainer.checkpoint_callback, ModelCheckpoint):
        val.update({k: v for k, v in trainer.checkpoint_callback.best_validation().items() if k in val})
    return {
        "status": "completed" if pruned_at_epoch is None else "pruned",
        **({} if pruned_at_epoch is None else {"pruned_at_epoch": pruned_at_epoch}),
        **val,
        **test,
        "epochs": epochs,
        "global_step": global_step,
        "best_model_path": tested,
        "wall_time_s": round(time.time() - started, 2),
        "weights_id": model.weights_id,
        "backbone": cfg.model.backbone,
        "image_size": cfg.model.image_size,
        "precision": precision,
        "feature_cache": feature_cache.summary() if feature_cache else "off",
        "extraction": feature_cache.extraction_summary() if feature_cache else None,
        "config_hash": config_hash(cfg),
        "objective": OmegaConf.to_container(cfg.objective),
        "resumed_from": resumed_from,
    }


def write_run_record(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """metrics.json and the resolved config.yaml, into the run dir."""
    output_dir = Path(cfg.paths.output_dir)
    atomic_write_json(output_dir / "metrics.json", metrics)
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info(
        "val acc %s, test acc %s -> %s", metrics.get("val/acc"), metrics.get("test/acc"), output_dir / "metrics.json"
    )


def record_failed_job(cfg: DictConfig, status: str, error: str, start: float) -> None:
    """Write a failed or interrupted job's metrics.json, so sweep summaries list it with its reason."""
    record = {
        "status": status,
        "error": error,
        "wall_time_s": round(time.time() - start, 2),
        "objective": OmegaConf.to_container(cfg.objective) if "objective" in cfg else None,
    }
    atomic_write_json(Path(cfg.paths.output_dir) / "metrics.json", record)


def summarize_stopped_sweep() -> None:
    """A stopped sweep never reaches Hydra's on_multirun_end: write its summary from here."""
    try:
        write_summary(HydraConfig.get().sweep.dir, plot=False)
    except Exception:  # the jobs' results are on disk; `python -m fmnist_tl.summarize` can redo this
        log.exception("could not write the summary of the stopped sweep")
