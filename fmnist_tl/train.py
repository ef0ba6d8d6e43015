"""Train the transfer classifier: `python -m fmnist_tl.train [hydra overrides]`.

`train(cfg)` is the whole job as a function (tests and sweepers call it); `main` adds Hydra and
turns user errors into one-line messages with a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch import callbacks
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from fmnist_tl.config import CONFIG_PATH
from fmnist_tl.core import FmnistError, atomic_write_json, atomic_write_text, remove_stale_temp_files
from fmnist_tl.evaluation import write_report
from fmnist_tl.features import feature_cache_for
from fmnist_tl.runtime import (
    build,
    config_hash,
    cpu_precision_probe,
    exit_on_user_error,
    finetune_trainer_overrides,
    full_error_wanted,
    instantiate_group,
    run_hydra_cli,
    validate_config,
)
from fmnist_tl.sweeps import pruned_epoch, write_summary
from fmnist_tl.training import (
    AtomicCheckpointIO,
    ModelCheckpoint,
    RecordTestOutputs,
    ReseedEachEpoch,
    TransferClassifier,
    check_checkpoint_file,
    check_resume_schedule,
    finetune_options,
    resolve_ckpt_path,
    resolve_precision,
)

log = logging.getLogger(__name__)


def _metric(trainer: L.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write metrics.json into the run dir; return the metrics."""
    start = time.time()
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path:
        check_resume_schedule(cfg, ckpt_path, check_checkpoint_file(ckpt_path))
        remove_stale_temp_files(Path(ckpt_path).parent)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    # Weights and data problems surface here, before a Trainer exists, so they leave no checkpoint.
    # Resuming a fine-tune run: the checkpoint holds the whole model, so neither init_from nor
    # ImageNet weights are read. (A head-only run still builds its weights: the feature cache
    # extracts in setup, before Lightning restores the checkpoint.)
    finetune = finetune_options(cfg.model.get("finetune"), cfg.model.backbone)
    resume_finetune = bool(ckpt_path) and finetune.first_epoch is not None
    # init_seed: a random init that a head-only checkpoint can rebuild (model.build_backbone).
    model: TransferClassifier = build(
        cfg.model, _recursive_=False, init_seed=cfg.seed, **({"load_weights": False} if resume_finetune else {})
    )
    if resume_finetune:  # weights_id is the checkpoint's once Lightning restores it
        log.info("Backbone %s; resuming a fine-tune run: all weights come from %s", cfg.model.backbone, ckpt_path)
    else:
        log.info("Backbone %s, weights %s", cfg.model.backbone, model.weights_id)
    datamodule: L.LightningDataModule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")

    callback_list = instantiate_group(cfg.get("callbacks"))
    if cfg.trainer.get("fast_dev_run"):
        # Lightning means fast_dev_run to save nothing, but ModelCheckpoint still writes last.ckpt
        # when training ends (save_last); a smoke test leaves no checkpoint behind.
        callback_list = [cb for cb in callback_list if not isinstance(cb, callbacks.Checkpoint)]
    # Real path: how ModelCheckpoint itself records its dirpath, so an unmoved folder compares equal.
    resume_dir = os.path.realpath(Path(ckpt_path).parent) if ckpt_path else None
    if resume_dir and Path(resume_dir).name == "checkpoints":
        # Keep checkpointing where the resumed run did: Lightning restores the best score and
        # top-k bookkeeping only when the checkpoint directory is unchanged.
        for cb in callback_list:
            if isinstance(cb, ModelCheckpoint):
                cb.dirpath, cb.rebase_resumed_paths = resume_dir, True
        log.info("Checkpoints continue in %s", resume_dir)
    # Frozen backbone, no augmentation: train the head on features extracted once (features.py).
    feature_cache = feature_cache_for(cfg, model, datamodule)
    if feature_cache:
        callback_list.append(feature_cache)
    # With cached features the backbone never runs in the trainer (extraction has its own probe), and
    # the head trains in fp32; otherwise auto on a CPU measures fp32 against bf16.
    precision = resolve_precision(cfg.trainer, None if feature_cache else cpu_precision_probe(cfg, model))
    trainer: L.Trainer = build(
        cfg.trainer,
        callbacks=[*callback_list, ReseedEachEpoch(cfg.seed)],
        logger=instantiate_group(cfg.get("logger")) or False,
        precision=precision,
        plugins=[AtomicCheckpointIO()],
        # No ModelCheckpoint configured (callbacks=none) means no checkpoint, not Lightning's default one.
        enable_checkpointing=any(isinstance(cb, callbacks.ModelCheckpoint) for cb in callback_list),
        **finetune_trainer_overrides(cfg),
    )
    log.info("Precision %s", precision)
    try:
        with warnings.catch_warnings():
            if resume_dir:
                # By design: a resumed run checkpoints into the resumed run's directory (see above).
                warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(resume_dir)} exists")
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except (SIGTERMException, KeyboardInterrupt, SystemExit) as e:
        # Lightning already ran OnExceptionCheckpoint; say where it is and how to go on.
        saved = output_dir / "checkpoints" / "on_exception.ckpt"
        where = f"; checkpoint saved at {saved}, resume with ckpt_path={saved}" if saved.is_file() else ""
        raise FmnistError(f"training interrupted ({type(e).__name__}){where}") from e
    val = {k: _metric(trainer, k) for k in ("val/acc", "val/f1", "val/loss")}
    pruned = pruned_epoch(trainer)  # an Optuna sweep's pruner stopped this trial (fmnist_tl.sweeps.TrialPruning)

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and not Path(best).is_file():
        # A resumed run restores the best path recorded in its checkpoint; that run folder may be gone.
        last = trainer.checkpoint_callback.last_model_path
        fallback = last if last and Path(last).is_file() else ""
        log.warning("best checkpoint %s no longer exists; testing %s", best, fallback or "the final weights")
        best = fallback
    test: dict[str, float | None] = {}
    if cfg.get("test"):
        use_best = bool(best) and not trainer.fast_dev_run
        # The recorder keeps the test logits, so the report costs no second pass over the test set.
        recorder = RecordTestOutputs()
        trainer.callbacks.append(recorder)
        if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
            # Under ddp_spawn (trainer=ddp_sim) the test runs in new processes, where Lightning's
            # CSVLogger starts a new writer that deletes the fit's csv/metrics.csv (with a warning).
            # The test metrics go to metrics.json and the report.
            trainer.loggers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]
        trainer.test(model, datamodule=datamodule, ckpt_path=best if use_best else None, weights_only=True)
        test = {k: _metric(trainer, k) for k in ("test/acc", "test/f1", "test/loss")}
        tested = best if use_best else "the final weights of this run (no checkpoint saved)"
        if trainer.world_size == 1 and not trainer.fast_dev_run:
            plots = bool(OmegaConf.select(cfg, "report.plots", default=True))
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
                finetune_start=finetune.first_epoch,
            )
        elif use_best and trainer.is_global_zero:
            log.info(
                "no automatic report under %d processes; run: python -m fmnist_tl.evaluate ckpt_path=%s",
                trainer.world_size,
                best,
            )
    if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_score is not None:
        # The best checkpoint's validation figures, not the last epoch's.
        val.update({k: v for k, v in getattr(trainer.checkpoint_callback, "best_metrics", {}).items() if k in val})
        val[cfg.objective.metric] = float(trainer.checkpoint_callback.best_model_score)

    metrics = {
        "status": "completed" if pruned is None else "pruned",
        **({} if pruned is None else {"pruned_at_epoch": pruned}),
        **val,
        **test,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "best_model_path": best,
        "wall_time_s": round(time.time() - start, 2),
        "weights_id": model.weights_id,
        "backbone": cfg.model.backbone,
        "image_size": cfg.model.image_size,
        "precision": precision,
        "feature_cache": feature_cache.summary() if feature_cache else "off",
        "extraction": feature_cache.extraction_summary() if feature_cache else None,
        "config_hash": config_hash(cfg),
        "objective": OmegaConf.to_container(cfg.objective),
        "resumed_from": ckpt_path,
    }
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "metrics.json", metrics)
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        log.info(
            "val acc %s, test acc %s -> %s",
            metrics.get("val/acc"),
            metrics.get("test/acc"),
            output_dir / "metrics.json",
        )
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


def record_failed_job(cfg: DictConfig, status: str, error: str, start: float) -> None:
    """Write a failed or interrupted job's metrics.json, so sweep summaries list it with its reason."""
    record = {
        "status": status,
        "error": error,
        "wall_time_s": round(time.time() - start, 2),
        "objective": OmegaConf.to_container(cfg.objective) if "objective" in cfg else None,
    }
    atomic_write_json(Path(cfg.paths.output_dir) / "metrics.json", record)


def _summarize_stopped_sweep() -> None:
    """A stopped sweep never reaches Hydra's on_multirun_end: write its summary from here."""
    try:
        write_summary(HydraConfig.get().sweep.dir, plot=False)
    except Exception:  # the jobs' results are on disk; `python -m fmnist_tl.summarize` can redo this
        log.exception("could not write the summary of the stopped sweep")


def _interruption(e: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM behind an exception, also when it arrives wrapped in another error."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (KeyboardInterrupt, SystemExit)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _job_error(e: BaseException) -> str:
    message = str(e) if isinstance(e, FmnistError) else f"{type(e).__name__}: {e}"
    return message.strip().splitlines()[0] if message.strip() else type(e).__name__


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float:
    start = time.time()
    multirun = _is_multirun()
    with exit_on_user_error(hydra_run=True):
        try:
            validate_config(cfg)  # a refused config says only that (train() checks again, cheaply)
            note_experiment_overrides(cfg)
            metrics = train(cfg)
        except BaseException as e:
            if not multirun:
                if isinstance(e, KeyboardInterrupt) and not full_error_wanted():
                    print("error: interrupted", file=sys.stderr)
                    sys.exit(130)
                raise
            interrupted = _interruption(e)
            if interrupted is not None:
                # Ctrl-C and SIGTERM stop the whole sweep, not just this job (mid-fit, Lightning
                # turns them into SystemExit / SIGTERMException). Record, summarise, exit.
                signal_name = "SIGTERM" if isinstance(interrupted, SIGTERMException) else "Ctrl-C"
                why = str(e) if isinstance(e, FmnistError) else f"stopped by {signal_name}"
                record_failed_job(cfg, "interrupted", f"{why}; the sweep stopped here", start)
                _summarize_stopped_sweep()
                if full_error_wanted():
                    raise
                print(f"error: {why}; the sweep stopped here", file=sys.stderr)
                sys.exit(143 if signal_name == "SIGTERM" else 130)
            if not isinstance(e, Exception):
                raise
            # One failing job must not kill the sweep: any exception (a user error, a NaN loss, a
            # bug, out of memory) is recorded in the job's metrics.json, with the trace of a bug in
            # the job's log; sweepers get NaN (Optuna marks the trial failed) and go on.
            log.error("job failed: %s", _job_error(e), exc_info=not isinstance(e, FmnistError))
            record_failed_job(cfg, "failed", _job_error(e), start)
            return float("nan")
    print(json.dumps({k: metrics[k] for k in ("val/acc", "val/f1", "test/acc", "test/f1") if k in metrics}))
    value = metrics.get(cfg.objective.metric)
    return float("nan") if value is None else float(value)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    run_hydra_cli(main, "train")
