"""The jobs of a sweep dir, read and ranked by the objective (the data behind the sweep summary).

Each job dir's `.hydra/overrides.yaml` (Hydra writes it before the job starts) gives its overrides,
its `metrics.json` (train writes it at the end, also for failed jobs) its status and metrics, and
its `.hydra/config.yaml` the objective it ranked its checkpoints by (`objective.metric` and
`objective.mode`, conf/train.yaml). A job dir without metrics.json is `incomplete` (still
running, killed, or crashed hard). Ranking uses that objective, a validation metric; test metrics
are shown only. A trial the Optuna sweeper's pruner stopped (`status: pruned`) ranks after the
completed jobs, as Optuna's best trial is always a completed one.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmnist_tl.core import FmnistError

METRICS = ("val/acc", "val/f1", "test/acc", "test/f1")
SEED_KEY = "seed"
# Overrides the Optuna sweeper adds to every trial (how a job reaches its trial; no on_exception.ckpt):
# plumbing, not what a trial tried, so the summary leaves them out.
SWEEPER_OVERRIDES = ("callbacks.optuna_trial", "callbacks.on_exception_checkpoint")


@dataclass
class Job:
    name: str  # the job's dir name; Hydra's job number by default
    run_dir: Path
    status: str  # completed | pruned | failed | interrupted | incomplete
    overrides: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    objective: tuple[str, str] | None = None  # (metric, max|min) the job ranked its checkpoints by

    def value(self, key: str) -> float | None:
        v = self.metrics.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    def extraction_images_per_s(self) -> float | None:
        """Images per second of the backbone's feature extraction in this job (every split it
        extracted, rather than found cached); None when it extracted nothing."""
        cache = self.metrics.get("feature_cache")
        done = [r for r in cache.values() if r.get("status") != "hit"] if isinstance(cache, dict) else []
        seconds = sum(float(r.get("seconds") or 0.0) for r in done)
        return sum(int(r.get("count") or 0) for r in done) / seconds if seconds > 0 else None


@dataclass
class Group:
    """Jobs whose overrides differ only in the seed."""

    overrides: dict[str, str]
    jobs: list[Job]

    def values(self, key: str) -> list[float]:
        return [v for j in self.jobs if j.status == "completed" and (v := j.value(key)) is not None]


@dataclass
class SweepSummary:
    sweep_dir: Path
    objective: str
    maximize: bool
    jobs: list[Job]  # ranked: finite objective first, best first; then the rest by job
    swept: list[str]  # override keys whose value differs between jobs
    common: dict[str, str]  # overrides every job shares
    groups: list[Group]  # ranked by mean objective; only when some configuration has several seeds

    @property
    def best(self) -> Job | None:
        top = self.jobs[0] if self.jobs else None
        return top if top is not None and top.status != "pruned" and top.value(self.objective) is not None else None

    def epochs(self) -> int:
        """Epochs trained in all jobs together (pruned ones stopped early)."""
        return sum(int(e) for j in self.jobs if isinstance(e := j.metrics.get("epochs"), int))

    def counts_text(self) -> str:
        """How many jobs ended each way, e.g. "3 completed, 1 failed"."""
        return ", ".join(f"{n} {s}" for s, n in sorted(Counter(j.status for j in self.jobs).items()))


def parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """`key=value` strings (as Hydra stores them) -> {key: value}; `+key` / `++key` count as key."""
    pairs = (str(line).partition("=") for line in lines)
    return {key.lstrip("+"): value for key, _, value in pairs}


def _load_yaml_list(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    try:
        # Unresolved: an override may hold an interpolation only the job could resolve (${hydra:...}).
        return [str(x) for x in OmegaConf.to_container(OmegaConf.load(path), resolve=False)]
    except Exception:  # a half-written or hand-edited file: treat as no overrides, the job still shows
        return []


def load_job(run_dir: Path) -> Job:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(_load_yaml_list(overrides_file)) if overrides_file.is_file() else {}
    overrides = {k: v for k, v in overrides.items() if k not in SWEEPER_OVERRIDES}
    metrics: dict[str, Any] = {}
    status = "incomplete"
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
            status = str(metrics.get("status", "completed"))
        except (OSError, ValueError) as e:
            metrics = {"error": f"unreadable metrics.json ({e})"}
    return Job(run_dir.name, run_dir, status, overrides, metrics, job_objective(run_dir, metrics))


def job_objective(run_dir: Path, metrics: Mapping[str, Any]) -> tuple[str, str] | None:
    """(metric, mode) from `objective` in the job's config as Hydra saved it (.hydra/config.yaml).

    Runs from before `objective` existed name only `optimized_metric` (in metrics.json); their
    checkpoints were always ranked by the highest value, so their mode is max.
    """
    from omegaconf import OmegaConf

    config_file = run_dir / ".hydra" / "config.yaml"
    if config_file.is_file():
        try:
            cfg = OmegaConf.load(config_file)
            metric, mode = OmegaConf.select(cfg, "objective.metric"), OmegaConf.select(cfg, "objective.mode")
        except Exception:  # half-written, hand-edited, or interpolating what only the run had: no say
            metric = mode = None
        if isinstance(metric, str) and mode in ("max", "min"):
            return metric, mode
    legacy = metrics.get("optimized_metric")
    return (str(legacy), "max") if legacy else None


def job_sort_key(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Job dirs are the sweep dir's children that Hydra configured (.hydra/) or train finished."""
    dirs = [
        d
        for d in sweep_dir.iterdir()
        if d.is_dir() and ((d / ".hydra" / "overrides.yaml").is_file() or (d / "metrics.json").is_file())
    ]
    return [load_job(d) for d in sorted(dirs, key=lambda d: job_sort_key(d.name))]


def _objective(jobs: list[Job]) -> tuple[str, str]:
    """The objective most jobs declared; conf/train.yaml's default when none did (none got to start)."""
    declared = [j.objective for j in jobs if j.objective is not None]
    return max(dict.fromkeys(declared), key=declared.count) if declared else ("val/acc", "max")


def summarize(sweep_dir: str | Path) -> SweepSummary:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FmnistError(f"{sweep_dir} is not a directory; pass a sweep dir such as logs/train/multiruns/<time>")
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FmnistError(
            f"{sweep_dir} holds no job dirs (with .hydra/overrides.yaml or metrics.json); is it a sweep dir?"
        )
    objective, mode = _objective(jobs)
    maximize = mode == "max"

    keys = sorted({k for j in jobs for k in j.overrides})
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    common = {k: jobs[0].overrides[k] for k in keys if k not in swept}

    def best_first(value: float | None) -> tuple[int, float]:
        """Sort key: the best value first, None last."""
        return (1, 0.0) if value is None else (0, -value if maximize else value)

    def rank(job: Job) -> tuple:
        """Jobs with a value first: completed ones best first, then pruned ones best first; then the rest."""
        value = job.value(objective)
        return (value is None, job.status == "pruned", *best_first(value), job_sort_key(job.name))

    jobs.sort(key=rank)

    by_config: dict[tuple, Group] = {}
    for job in jobs:
        config = {k: job.overrides.get(k, "") for k in swept if k != SEED_KEY}
        by_config.setdefault(tuple(config.items()), Group(config, [])).jobs.append(job)
    groups: list[Group] = []
    if SEED_KEY in swept and any(len(g.jobs) > 1 for g in by_config.values()):

        def group_key(g: Group) -> tuple[int, float]:
            vals = g.values(objective)
            return best_first(statistics.fmean(vals) if vals else None)

        groups = sorted(by_config.values(), key=group_key)
    return SweepSummary(sweep_dir, objective, maximize, jobs, swept, common, groups)
