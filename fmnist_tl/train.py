"""Train the transfer classifier: `python -m fmnist_tl.train [hydra overrides]`.

`train(cfg)` is the whole job as a function (tests and sweepers call it): check, build, fit, test,
record. `main` adds Hydra and the task wrapper (one-line errors, exit codes, a sweep job's record).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fmnist_tl.config import CONFIG_PATH
from fmnist_tl.core import remove_stale_temp_files
from fmnist_tl.features import feature_cache_for
from fmnist_tl.runtime import (
    Stop,
    build,
    build_model,
    build_trainer,
    cpu_precision_probe,
    record_failed_job,
    run_hydra_cli,
    run_metrics,
    run_test,
    set_aside_previous_run,
    summarize_stopped_sweep,
    task_wrapper,
    validate_config,
    write_run_record,
)
from fmnist_tl.sweeps import pruned_epoch
from fmnist_tl.training import (
    check_checkpoint_file,
    check_resume_schedule,
    fit_progress,
    resolve_ckpt_path,
    resolve_precision,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write metrics.json into the run dir; return the metrics."""
    started = time.time()
    finetune = validate_config(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        check_resume_schedule(cfg, ckpt_path, check_checkpoint_file(ckpt_path), finetune)
        remove_stale_temp_files(Path(ckpt_path).parent)
    set_aside_previous_run(Path(cfg.paths.output_dir), ckpt_path)
    Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    # Weights and data problems surface here, before a Trainer exists, so they leave no checkpoint.
    model = build_model(cfg, ckpt_path, finetune)
    datamodule: L.LightningDataModule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    # Frozen backbone, no augmentation: the head trains on features extracted once (fmnist_tl/features).
    feature_cache = feature_cache_for(cfg, model, datamodule)
    # With cached features the backbone never runs in the trainer (extraction has its own probe), and
    # the head trains in fp32; otherwise auto on a CPU measures fp32 against bf16.
    precision = resolve_precision(cfg.trainer, None if feature_cache else cpu_precision_probe(cfg, model))
    trainer = build_trainer(cfg, [feature_cache] if feature_cache else [], precision, finetune)

    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    # Before the test resets the trainer's metrics, which is where ddp_spawn's processes left these.
    pruned, progress = pruned_epoch(trainer), fit_progress(trainer)
    tested, test = run_test(cfg, trainer, model, datamodule, precision)

    metrics = run_metrics(
        cfg, trainer, model, test, tested, precision, feature_cache, started, ckpt_path, progress, pruned
    )
    if trainer.is_global_zero:
        write_run_record(cfg, metrics)
    return metrics


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{prefix}.{key}").items()}
    return {prefix: node}


def note_experiment_overrides(cfg: DictConfig) -> None:
    """Log one line when experiment=X replaces values of a group chosen on the same command line.

    The experiment is applied after the groups (so it can set anything), and a group choice such as
    model=resnet18 is not a value override, so the experiment's values win over it without a word.
    """
    hc = HydraConfig.get()
    experiment = hc.runtime.choices.get("experiment")
    overrides = list(hc.overrides.task)

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    chosen = [o for o in overrides if key(o) != "experiment" and key(o) in hc.runtime.choices]
    if experiment in (None, "null") or not chosen:
        return
    try:
        without = hydra.compose(hc.job.config_name, overrides=[o for o in overrides if key(o) != "experiment"])
    except Exception:  # only a note: never what stops a run
        log.debug("could not compose the config without experiment=%s", experiment, exc_info=True)
        return
    replaced = []
    for choice in chosen:
        path = key(choice).replace("/", ".")
        mine = _leaves(OmegaConf.to_container(OmegaConf.select(without, path) or {}), path)
        final = _leaves(OmegaConf.to_container(OmegaConf.select(cfg, path) or {}), path)
        # A null the group leaves (image_size, mean, std: from the weights) is filled in later, not replaced.
        replaced += [(choice, k, mine[k], v) for k, v in final.items() if mine.get(k) is not None and mine[k] != v]
    if replaced:
        log.warning(
            "experiment=%s replaces values your %s set: %s; to keep one, pass it as a value (e.g. %s=%s)",
            experiment,
            " ".join(dict.fromkeys(c for c, *_ in replaced)),
            ", ".join(f"{k} {mine} -> {final}" for _, k, mine, final in replaced),
            replaced[0][1],
            replaced[0][2],
        )


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _stopped(cfg: DictConfig, started: float, multirun: bool) -> Any:
    """What train adds to the task wrapper's report of a stop: the resume hint, a sweep job's record."""

    def on_stop(stop: Stop) -> Stop | None:
        if not multirun:
            if stop.status != "interrupted":
                return stop
            # OnExceptionCheckpoint saved the state when Lightning saw the signal.
            saved = Path(cfg.paths.output_dir) / "checkpoints" / "on_exception.ckpt"
            where = f"; checkpoint saved at {saved}, resume with ckpt_path={saved}" if saved.is_file() else ""
            return stop.with_line(f"training {stop.line}{where}")
        if stop.status == "interrupted":
            # Ctrl-C and SIGTERM stop the whole sweep, not just this job: record, summarise, exit.
            line = f"{stop.line.replace('interrupted', 'stopped')}; the sweep stopped here"
            record_failed_job(cfg, "interrupted", line, started)
            summarize_stopped_sweep()
            return stop.with_line(line)
        # One failing job must not kill the sweep: any exception (a user error, a NaN loss, a bug,
        # out of memory) is recorded in the job's metrics.json, with the trace of a bug in the job's
        # log; sweepers get NaN (Optuna marks the trial failed) and go on.
        log.error("job failed: %s", stop.line, exc_info=stop.bug)
        record_failed_job(cfg, "failed", stop.line, started)
        return None

    return on_stop


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float:
    metrics: dict[str, Any] = {}
    with task_wrapper(hydra_run=True, on_stop=_stopped(cfg, time.time(), _is_multirun())):
        note_experiment_overrides(cfg)
        metrics = train(cfg)
    if not metrics:  # a failed sweep job, recorded
        return float("nan")
    print(json.dumps({k: metrics[k] for k in ("val/acc", "val/f1", "test/acc", "test/f1") if k in metrics}))
    value = metrics.get(cfg.objective.metric)
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_hydra_cli(main, "train")
