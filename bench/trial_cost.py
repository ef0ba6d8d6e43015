"""What a head-only sweep trial costs besides its head epochs, and what a sweep costs in time and disk.

    python -m bench.trial_cost [--trials 4] [--sweep 20] [-- HYDRA OVERRIDES ...]

1. **Phases** (`--trials N`, default 4): N trials of `fmnist_tl.train.train` in one process, as
   Hydra's basic launcher runs a sweep's jobs, each composed from `conf/train.yaml` plus the
   overrides like a launched job, in its own run dir. Each phase's own time (nested phases
   subtracted) is measured by wrapping the functions that do the work; "epochs" is the time from the
   start of each training epoch to the end of its validation. The fixed cost of a trial is its wall
   time minus its epochs. The first trial pays one-off costs (imports, the cold feature cache) and
   is reported apart; the table shows the median of the others.
2. **Sweep** (`--sweep N`): the real command, `python -m fmnist_tl.train -m
   hparams_search=head_optuna hydra.sweeper.n_trials=N` plus the overrides, in a fresh log dir
   sharing the feature cache (`paths.cache_dir`): its wall time and the disk its study dir holds.

3. **Floor** (`--floor`): the trials' head, batch size, optimizer and thread count in a plain
   PyTorch loop over the same number of float16 features (no Lightning, no metrics, no
   validation), timed in the same process right after the trials: what a head epoch's training
   steps cost at least on this machine. `trial_epoch_over_floor` divides the trials' epochs
   (validation included) by it, so it bounds what the loop around the head adds from above. Also
   the first layer's matrix products alone (forward and weight gradient), the arithmetic no loop avoids.

Run it with a warm feature cache for the figures to mean "a trial on a warm cache" (the first
phase trial warms it otherwise), or with --synthetic-features: seeded random features stand in
for the cache, for the head's per-step cost without extraction. Prints a markdown table and
writes JSON to --out when given; --results FILE writes (or extends) a flat results file, one row
per trial, phase and sweep, each labelled with --label (the code measured), with the machine and
load average (docs/trial-cost.md).
Targets (issue 12, 224 px ResNet50, full data, 2 CPU cores): fixed cost <= 3 s per trial,
20-trial sweep <= 3 min, <= 10 MB of disk per trial.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGETS = {"fixed_s": 3.0, "sweep20_s": 180.0, "disk_mb_per_trial": 10.0}


class Phases:
    """Exclusive wall time per named phase: a phase's time excludes the phases nested in it.

    `cpu` holds the same for this process's CPU time, which a busy machine inflates far less than
    wall time (the head trains on one thread), so before/after figures from a shared machine compare.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []

    def push(self, name: str) -> None:
        self.stack.append([name, time.perf_counter(), 0.0, time.process_time(), 0.0])

    def pop(self) -> None:
        name, start, nested, cpu_start, cpu_nested = self.stack.pop()
        took, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        self.totals[name] += took - nested
        self.cpu[name] += cpu - cpu_nested
        if self.stack:
            self.stack[-1][2] += took
            self.stack[-1][4] += cpu

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        original = getattr(owner, attr)

        # wraps: code that reads the signature (schemas.trainer_keys reads Trainer.__init__'s) still sees it.
        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.push(name)
            try:
                return original(*args, **kwargs)
            finally:
                self.pop()

        setattr(owner, attr, timed)

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        out, cpu = dict(self.totals), dict(self.cpu)
        self.totals, self.cpu = defaultdict(float), defaultdict(float)
        return out, cpu


def instrument(phases: Phases) -> Callable[[], Any]:
    """Wrap the functions a trial spends its time in; returns the epoch-timing callback class."""
    import lightning as L

    import fmnist_tl.backbones.weights as weights_module
    import fmnist_tl.features.cache as features
    import fmnist_tl.runtime.record as record_module
    import fmnist_tl.train as train_module
    import fmnist_tl.training.callbacks as callbacks
    from fmnist_tl.data import FashionMNISTDataModule

    phases.wrap(train_module, "validate_config", "config checks")
    # Not TransferClassifier.__init__: Lightning's save_hyperparameters reads that frame's arguments.
    phases.wrap(weights_module, "build_backbone", "backbone build")
    phases.wrap(FashionMNISTDataModule, "prepare_data", "data")
    phases.wrap(FashionMNISTDataModule, "setup", "data")
    phases.wrap(features.FeatureCache, "setup", "feature cache")
    phases.wrap(L.Trainer, "__init__", "trainer init")
    phases.wrap(L.Trainer, "fit", "fit, outside epochs")
    phases.wrap(L.Trainer, "test", "test")
    phases.wrap(callbacks.AtomicCheckpointIO, "save_checkpoint", "checkpoint save")
    phases.wrap(callbacks.AtomicCheckpointIO, "load_checkpoint", "checkpoint load")
    # train()'s record step (fmnist_tl/runtime/record.py) looks these up in its module at call time.
    phases.wrap(record_module, "write_report", "report")
    phases.wrap(record_module, "atomic_write_json", "metrics/config files")
    phases.wrap(record_module, "atomic_write_text", "metrics/config files")

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            phases.push("epochs")

        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not trainer.sanity_checking and phases.stack and phases.stack[-1][0] == "epochs":
                phases.pop()

    original_init = L.Trainer.__init__

    @functools.wraps(original_init)
    def trainer_init(self: L.Trainer, *args: Any, callbacks: Any = None, **kwargs: Any) -> None:
        original_init(self, *args, callbacks=[*(callbacks or []), EpochTimer()], **kwargs)

    L.Trainer.__init__ = trainer_init
    return EpochTimer


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def synthetic_features(width: int = 2048) -> None:
    """Serve seeded random features (float16, as the store holds fp32 extractions) in place of the
    feature cache: a head step costs the same whatever the values, so per-step figures need no warm
    cache (hours of extraction at 224 px on a CPU). Made once per split size and reused by later
    trials, as a warm cache would be; the "feature cache" phase is then not the real one."""
    import torch

    import fmnist_tl.features.cache as features

    made: dict[int, torch.Tensor] = {}

    def setup(self: Any, trainer: Any, pl_module: Any, stage: str) -> None:
        dm = trainer.datamodule
        for split in features.STAGE_SPLITS.get(stage, ()):
            images, labels = dm.split_tensors(split)
            if not features.holds_features(images):
                if len(labels) not in made:
                    g = torch.Generator().manual_seed(len(labels))
                    made[len(labels)] = torch.randn(len(labels), width, generator=g).half()
                dm.use_cached_features(split, made[len(labels)])
        self._use_head_threads()

    features.FeatureCache.setup = setup


def run_phases(n_trials: int, overrides: list[str], root: Path, synthetic: bool = False) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from fmnist_tl.config import compose_config
    from fmnist_tl.train import train

    phases = Phases()
    if synthetic:
        synthetic_features()
    instrument(phases)
    trials = []
    for i in range(n_trials):
        out = root / "phases" / str(i)
        start, cpu_start = time.perf_counter(), time.process_time()
        phases.push("config (Hydra compose)")
        cfg = compose_config("train", overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            del cfg.hydra
        phases.pop()
        metrics = train(cfg)
        wall, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
        took, cpu = phases.take()
        trials.append(
            {
                "wall_s": wall,
                "epochs": metrics.get("epochs"),
                "epochs_s": took.get("epochs", 0.0),
                "fixed_s": wall - took.get("epochs", 0.0),
                "cpu_s": cpu_total,
                "epochs_cpu_s": cpu.get("epochs", 0.0),
                "fixed_cpu_s": cpu_total - cpu.get("epochs", 0.0),
                "phases_cpu": cpu,
                "phases": took,
                "disk_bytes": du_bytes(out),
                "global_step": metrics.get("global_step"),
                "val_acc": metrics.get("val/acc"),
            }
        )
        print(f"[trial_cost] trial {i}: {wall:.2f} s, epochs {took.get('epochs', 0):.2f} s", file=sys.stderr)
    return {"trials": trials}


def head_floor(overrides: list[str], steps: int, epochs: int = 2) -> dict[str, Any]:
    """A head epoch of `steps` steps in a plain PyTorch loop: the trials' head (model.head), optimizer
    (model.optimizer), batch size and head threads, on seeded float16 features; the median of
    `epochs` after a warm-up epoch. Plus the first layer's forward and weight-gradient matmuls alone."""
    import hydra
    import torch
    from torch import nn

    from fmnist_tl.backbones import feature_dim, preprocessing
    from fmnist_tl.config import compose_config
    from fmnist_tl.training import build_head

    cfg = compose_config("train", overrides)
    # The width the trials' head reads, found as TransferClassifier finds it (image size from the weights).
    size = preprocessing(cfg.model.backbone, cfg.model.weights, cfg.model.image_size)[0]
    width = feature_dim(cfg.model.backbone, cfg.model.weights, size)
    head = build_head(width, cfg.model.num_classes, list(cfg.model.head.hidden_dims), cfg.model.head.dropout)
    optimizer = hydra.utils.instantiate(cfg.model.optimizer)(head.parameters())
    batch, threads_before = int(cfg.data.batch_size), torch.get_num_threads()
    torch.set_num_threads(cfg.features.head_threads or threads_before)
    g = torch.Generator().manual_seed(0)
    train_size = steps * batch
    features = torch.randn(train_size, width, generator=g).half()
    labels = torch.randint(0, cfg.model.num_classes, (train_size,), generator=g)

    def epoch() -> float:
        order = torch.randperm(train_size, generator=g)
        start = time.perf_counter()
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            loss = nn.functional.cross_entropy(head(features[idx].float()), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    def matmuls() -> float:
        weight = head[0].weight.detach()
        x, grad = torch.randn(batch, width), torch.randn(batch, weight.shape[0])
        start = time.perf_counter()
        for _ in range(steps):
            x @ weight.t()  # forward
            grad.t() @ x  # weight gradient (the features need none)
        return time.perf_counter() - start

    try:
        epoch()
        seconds = statistics.median(epoch() for _ in range(epochs))
        matmuls()
        matmul = statistics.median(matmuls() for _ in range(epochs))
    finally:
        torch.set_num_threads(threads_before)
    return {"steps": steps, "batch": batch, "threads": cfg.features.head_threads, "epoch_s": seconds,
            "first_layer_matmuls_s": matmul}  # fmt: skip


def run_sweep(n_trials: int, overrides: list[str], root: Path) -> dict[str, Any]:
    # The feature cache stays where the overrides (or the default paths) put it; logs go to a fresh dir.
    # The phase trials may name hparams_search=head_optuna already (for a sweep trial's settings).
    search = [] if "hparams_search=head_optuna" in overrides else ["hparams_search=head_optuna"]
    cmd = [sys.executable, "-m", "fmnist_tl.train", "-m", *search,
           f"hydra.sweeper.n_trials={n_trials}", f"paths.log_dir={root / 'logs'}", *overrides]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    study = root / "logs" / "train" / "studies" / "head_optuna"
    jobs = [json.loads(p.read_text()) for p in study.glob("*/metrics.json")] if study.is_dir() else []
    disk = du_bytes(study) if study.is_dir() else 0
    return {
        "command": " ".join(["python", *cmd[1:]]),
        "returncode": proc.returncode,
        "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
        "wall_s": wall,
        "trials": len(jobs),
        "completed": sum(j.get("status") == "completed" for j in jobs),
        "trial_wall_s": sorted(j.get("wall_time_s", 0.0) for j in jobs),
        "head_epochs": sum(j.get("epochs") or 0 for j in jobs),
        "disk_bytes": disk,
        "disk_mb_per_trial": disk / max(1, len(jobs)) / 1e6,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"CPU: {report['machine']['cpu']}, {report['machine']['cores']} cores; overrides: `{report['overrides']}`"]
    trials = report.get("phases", {}).get("trials", [])
    if trials:
        later = trials[1:] or trials
        med = {k: statistics.median(t[k] for t in later) for k in ("wall_s", "epochs_s", "fixed_s")}
        names = sorted({n for t in later for n in t["phases"]} - {"epochs"})
        lines += [
            "",
            f"Per trial (median of trials 2..{len(trials)}; trial 1 apart): "
            f"wall {med['wall_s']:.2f} s = head epochs {med['epochs_s']:.2f} s + fixed {med['fixed_s']:.2f} s "
            f"(target <= {TARGETS['fixed_s']} s); "
            f"disk {statistics.median(t['disk_bytes'] for t in later) / 1e6:.1f} MB",
            "",
            "| phase | trial 1 s | median later s | median later CPU s |",
            "| --- | ---: | ---: | ---: |",
        ]
        rows = []
        for name in names:
            rows.append((statistics.median(t["phases"].get(name, 0.0) for t in later), name))
        accounted = sum(v for v, _ in rows)
        cpu = {k: statistics.median(t[k] for t in later) for k in ("fixed_cpu_s", "epochs_cpu_s")}
        for value, name in sorted(rows, reverse=True):
            cpu_s = statistics.median(t["phases_cpu"].get(name, 0.0) for t in later)
            lines.append(f"| {name} | {trials[0]['phases'].get(name, 0.0):.2f} | {value:.2f} | {cpu_s:.2f} |")
        lines.append(f"| other (train() glue, logging, GC) |  | {med['fixed_s'] - accounted:.2f} | |")
        lines.append(
            f"| **fixed total** | {trials[0]['fixed_s']:.2f} | **{med['fixed_s']:.2f}** | {cpu['fixed_cpu_s']:.2f} |"
        )
        lines.append(
            f"| head epochs | {trials[0]['epochs_s']:.2f} | {med['epochs_s']:.2f} | {cpu['epochs_cpu_s']:.2f} |"
        )
    floor = report.get("floor")
    if floor:
        lines += [
            "",
            f"Floor: the same head in a plain PyTorch loop, {floor['steps']} steps of {floor['batch']}: "
            f"{floor['epoch_s']:.2f} s per epoch; its first layer's matmuls alone "
            f"{floor['first_layer_matmuls_s']:.2f} s",
        ]
    sweep = report.get("sweep")
    if sweep:
        lines += [
            "",
            f"Sweep: `{sweep['command']}`",
            f"{sweep['trials']} trials ({sweep['completed']} completed) in {sweep['wall_s']:.0f} s end to end "
            f"(target <= {TARGETS['sweep20_s']:.0f} s for 20); study dir {sweep['disk_bytes'] / 1e6:.1f} MB, "
            f"{sweep['disk_mb_per_trial']:.2f} MB per trial (target <= {TARGETS['disk_mb_per_trial']:.0f})"
            + (f"; FAILED (exit {sweep['returncode']})" if sweep["returncode"] else ""),
        ]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "load_average_start": os.getloadavg()}


def flat(report: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """The report as rows of one level (a docs renderer shows any bench/results/*.json as a table)."""
    rows: list[dict[str, Any]] = []
    trials = report.get("phases", {}).get("trials", [])
    for i, t in enumerate(trials):
        steps = t.get("global_step") or 0
        rows.append(
            {
                "code": label,
                "quantity": f"trial {i + 1}" + (" (first: imports, caches)" if i == 0 else ""),
                "features": "synthetic" if report.get("synthetic_features") else "cache",
                "wall_s": round(t["wall_s"], 2),
                "fixed_s": round(t["fixed_s"], 2),
                "fixed_cpu_s": round(t["fixed_cpu_s"], 2),
                "head_epochs": t["epochs"],
                "head_epochs_s": round(t["epochs_s"], 2),
                "s_per_head_epoch": round(t["epochs_s"] / t["epochs"], 2) if t["epochs"] else None,
                "cpu_s_per_head_epoch": round(t["epochs_cpu_s"] / t["epochs"], 2) if t["epochs"] else None,
                # Train steps only in the count; the time includes each epoch's validation.
                "ms_per_train_step": round(1000 * t["epochs_s"] / steps, 2) if steps else None,
                "cpu_ms_per_train_step": round(1000 * t["epochs_cpu_s"] / steps, 2) if steps else None,
                "disk_mb": round(t["disk_bytes"] / 1e6, 2),
                "val_acc": t.get("val_acc"),
            }
        )
    later = trials[1:] or trials
    for name in sorted({n for t in later for n in t["phases"]} - {"epochs"}):
        rows.append(
            {
                "code": label,
                "quantity": f"phase: {name}",
                "first_trial_s": round(trials[0]["phases"].get(name, 0.0), 3),
                "median_later_s": round(statistics.median(t["phases"].get(name, 0.0) for t in later), 3),
                "median_later_cpu_s": round(statistics.median(t["phases_cpu"].get(name, 0.0) for t in later), 3),
            }
        )
    floor = report.get("floor")
    if floor:
        steps = floor["steps"]
        measured = [t["epochs_s"] / t["epochs"] for t in later if t["epochs"]]
        trial_epoch = statistics.median(measured) if measured else None
        rows.append(
            {
                "code": label,
                "quantity": "floor: head epoch in a plain PyTorch loop (train steps only)",
                "s_per_head_epoch": round(floor["epoch_s"], 2),
                "ms_per_train_step": round(1000 * floor["epoch_s"] / steps, 2),
                "first_layer_matmuls_s": round(floor["first_layer_matmuls_s"], 2),
                "trial_epoch_over_floor": round(trial_epoch / floor["epoch_s"], 2) if trial_epoch else None,
            }
        )
    sweep = report.get("sweep")
    if sweep:
        rows.append(
            {
                "code": label,
                "quantity": f"sweep of {sweep['trials']} trials",
                "wall_s": round(sweep["wall_s"], 1),
                "completed": sweep["completed"],
                "head_epochs": sweep.get("head_epochs"),
                "disk_mb": round(sweep["disk_bytes"] / 1e6, 2),
                "disk_mb_per_trial": round(sweep["disk_mb_per_trial"], 2),
                "returncode": sweep["returncode"],
            }
        )
    return rows


def write_results(path: Path, report: dict[str, Any], label: str, argv: list[str]) -> None:
    """Write (or, for a file of the same shape, extend) a flat results file; rows carry `label`."""
    import torch

    from fmnist_tl.core import atomic_write_text

    doc: dict[str, Any] = {}
    if path.is_file():
        doc = json.loads(path.read_text())
    m = report["machine"]
    doc.setdefault("date", time.strftime("%Y-%m-%d"))
    command = "python -m bench.trial_cost " + " ".join(argv)
    doc.setdefault("command", command)
    # Each label's own command: rows appended later were often measured with other arguments.
    doc.setdefault("commands", {})[label] = command
    doc.setdefault("machine", {"cpu": m["cpu"], "cores": m["cores"], "torch": torch.__version__})
    doc.setdefault("load_average", [])
    doc["load_average"] += [[label, "start", *m["load_average_start"]], [label, "end", *report["load_average_end"]]]
    doc.setdefault("rows", [])
    doc["rows"] += flat(report, label)
    doc.setdefault("notes", "")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")  # key order kept: table columns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4, help="phase trials in one process (0: skip)")
    parser.add_argument("--sweep", type=int, default=0, help="also run an N-trial head_optuna sweep")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs (printed)")
    parser.add_argument(
        "--results",
        type=Path,
        help="write flat rows here (bench/results/DATE-trial-cost.json); an existing file is extended",
    )
    parser.add_argument(
        "--synthetic-features",
        action="store_true",
        help="phase trials on seeded random 2048-d features instead of the feature cache (no warm cache needed)",
    )
    parser.add_argument("--floor", action="store_true", help="also time the same head in a plain PyTorch loop")
    parser.add_argument("--label", default="", help="the code measured, on every row of --results (e.g. a commit)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every trial (after --)")
    args = parser.parse_args(argv)
    if args.floor and not args.trials:
        parser.error("--floor needs the phase trials (--trials >= 1): it runs as many steps as their epochs")
    root = Path(tempfile.mkdtemp(prefix="trial_cost-"))
    report: dict[str, Any] = {"machine": machine(), "overrides": " ".join(args.overrides), "targets": TARGETS}
    report["synthetic_features"] = args.synthetic_features
    try:
        if args.trials:
            report["phases"] = run_phases(args.trials, list(args.overrides), root, args.synthetic_features)
        if args.floor:
            trials = report.get("phases", {}).get("trials", [])
            steps = [t["global_step"] // t["epochs"] for t in trials if t["epochs"]]
            if not steps:
                raise SystemExit("error: --floor: the trials trained no epoch, so there is no step count to match")
            report["floor"] = head_floor(list(args.overrides), steps[-1])
        if args.sweep:
            report["sweep"] = run_sweep(args.sweep, list(args.overrides), root)
    finally:
        if args.keep:
            print(f"run dirs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    report["load_average_end"] = os.getloadavg()
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.results:
        write_results(args.results, report, args.label, sys.argv[1:] if argv is None else argv)
    return 0 if report.get("sweep", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
