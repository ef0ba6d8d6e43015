"""One table for a whole sweep: sweep_summary.{csv,md,png} in the sweep dir (docs/sweeps.md lists their columns).

Every Hydra multirun ends with this summary (`SweepSummaryCallback`, registered in
conf/hydra/default.yaml); `python -m fmnist_tl.summarize` writes it for any sweep dir, including
one still running or interrupted. The jobs are read and ranked by fmnist_tl/sweeps/results.py; the
md adds mean ± std over seeds per configuration (also `sweep_summary_by_config.csv`) when some
configurations were run with several seeds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fmnist_tl.core import atomic_path, atomic_write_text
from fmnist_tl.sweeps.results import METRICS, SEED_KEY, Job, SweepSummary, job_sort_key, summarize

log = logging.getLogger(__name__)

CSV_NAME = "sweep_summary.csv"
MD_NAME = "sweep_summary.md"
PNG_NAME = "sweep_summary.png"
BY_CONFIG_NAME = "sweep_summary_by_config.csv"


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.{digits}f}"
    return "" if v is None else str(v)


def _short(value: str) -> str:
    """Optuna suggests floats like 0.0002801635158716264; 4 significant digits are enough to read."""
    try:
        f = float(value)
    except ValueError:
        return value
    return value if value.lstrip("-").isdigit() else f"{f:.4g}"


def _overrides_text(overrides: dict[str, str], keys: Sequence[str], short: bool = False) -> str:
    return " ".join(f"{k}={_short(overrides[k]) if short else overrides[k]}" for k in keys if k in overrides)


def _mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _metric_cols(summary: SweepSummary) -> list[str]:
    """The val/test metrics, and the objective when it is none of them."""
    return list(METRICS) + ([summary.objective] if summary.objective not in METRICS else [])


def job_rows(summary: SweepSummary) -> list[dict[str, Any]]:
    metric_cols = _metric_cols(summary)
    return [
        {
            "rank": rank,
            "best": "*" if job is summary.best else "",
            "job": job.name,
            "status": job.status,
            **{k: job.overrides.get(k, "") for k in summary.swept},
            "overrides": _overrides_text(job.overrides, summary.swept),
            **{m: job.value(m) for m in metric_cols},
            "epochs": job.metrics.get("epochs"),
            "extraction_img_per_s": job.extraction_images_per_s(),
            "wall_time_s": job.value("wall_time_s"),
            "error": job.metrics.get("error", ""),
            "run_dir": str(job.run_dir),
        }
        for rank, job in enumerate(summary.jobs, start=1)
    ]


def group_rows(summary: SweepSummary) -> list[dict[str, Any]]:
    rows = []
    for rank, group in enumerate(summary.groups, start=1):
        row: dict[str, Any] = {
            "rank": rank,
            "best": "*" if rank == 1 and group.values(summary.objective) else "",
            "overrides": _overrides_text(group.overrides, list(group.overrides)),
            "seeds": len(group.jobs),
            "completed": sum(j.status == "completed" for j in group.jobs),
        }
        for m in _metric_cols(summary):
            vals = group.values(m)
            row[f"{m} mean"] = statistics.fmean(vals) if vals else None
            row[f"{m} std"] = statistics.stdev(vals) if len(vals) > 1 else None
        rows.append(row)
    return rows


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(summary: SweepSummary, plot: Path | None) -> str:
    direction = "maximised" if summary.maximize else "minimised"
    job_time = sum(j.value("wall_time_s") or 0.0 for j in summary.jobs)
    out = [
        f"# Sweep summary: `{summary.sweep_dir}`",
        "",
        f"{len(summary.jobs)} jobs: {summary.counts_text()}. Ranked by `{summary.objective}` ({direction});"
        f" test metrics are shown, never used to rank. Time in jobs: {job_time:.0f} s;"
        f" epochs in jobs: {summary.epochs()}.",
        "",
    ]
    pruned = [j for j in summary.jobs if j.status == "pruned"]
    if pruned:
        at = ", ".join(
            f"{j.name}: {j.metrics.get('pruned_at_epoch', '?')}"
            for j in sorted(pruned, key=lambda j: job_sort_key(j.name))
        )
        out += [
            f"{len(pruned)} trials pruned (stopped by the sweep's pruner after the epoch given; ranked after the"
            f" completed ones, never best): {at}.",
            "",
        ]
    if summary.common:
        out += [f"Common overrides: `{_overrides_text(summary.common, list(summary.common))}`", ""]
    metric_cols = _metric_cols(summary)
    # A backbone sweep compares extraction speed too (the feature cache's img/s, when a job extracted).
    extraction = any(job.extraction_images_per_s() is not None for job in summary.jobs)
    header = ["rank", "best", "job", "status", "overrides", *metric_cols, "epochs"]
    header += ["extract img/s"] * extraction + ["wall s", "error"]
    rows = [
        [
            str(rank),
            "**best**" if job is summary.best else "",
            job.name,
            job.status,
            f"`{_overrides_text(job.overrides, summary.swept, short=True)}`" if summary.swept else "",
            *[_fmt(job.value(m)) for m in metric_cols],
            _fmt(job.metrics.get("epochs")),
            *[_fmt(job.extraction_images_per_s(), 1)] * extraction,
            _fmt(job.value("wall_time_s"), 1),
            str(job.metrics.get("error", "")),
        ]
        for rank, job in enumerate(summary.jobs, start=1)
    ]
    out += [_md_table(header, rows), ""]
    if summary.groups:
        out += [f"## By configuration: mean ± std over seeds (sample std), ranked by mean `{summary.objective}`", ""]
        gheader = ["rank", "best", "overrides", "seeds", "completed", *metric_cols]
        grows = [
            [
                str(row["rank"]),
                "**best**" if row["best"] else "",
                f"`{_overrides_text(group.overrides, list(group.overrides), short=True)}`",
                str(row["seeds"]),
                str(row["completed"]),
                *[_mean_std(group.values(m)) for m in metric_cols],
            ]
            for row, group in zip(group_rows(summary), summary.groups, strict=True)
        ]
        out += [_md_table(gheader, grows), ""]
    if plot is not None:
        out += [f"![{summary.objective} against each swept parameter]({plot.name})", ""]
    return "\n".join(out)


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def log_searched_keys(jobs: list[Job]) -> set[str]:
    """Keys an Optuna sweep searched on a log scale (`tag(log, ...)` in hydra.sweeper.params)."""
    from omegaconf import OmegaConf

    for job in jobs:
        hydra_yaml = job.run_dir / ".hydra" / "hydra.yaml"
        if hydra_yaml.is_file():
            try:
                params = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.sweeper.params")
                params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
            except Exception:  # unreadable: fall back to judging the values alone
                return set()
            return {str(k) for k, v in params.items() if "log" in str(v)}
    return set()


def _category_order(labels: list[str]) -> list[str]:
    """Lists such as hidden dims by length, then value ([] [128] [256] [256,128]); else as given."""
    import yaml

    try:
        parsed = [yaml.safe_load(v) for v in labels]
        if all(isinstance(p, list) for p in parsed):
            return [v for _, v in sorted(zip(parsed, labels, strict=True), key=lambda pv: (len(pv[0]), pv[0]))]
    except Exception:  # not YAML, or lists that do not compare: keep the jobs' order
        pass
    return labels


def plot_objective(summary: SweepSummary, path: Path) -> bool:
    """Objective against each swept parameter; failed jobs as red crosses along the bottom."""
    params = [k for k in summary.swept if k != SEED_KEY] or list(summary.swept)
    done = [j for j in summary.jobs if j.value(summary.objective) is not None]
    if not params or not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    log_keys = log_searched_keys(summary.jobs)
    failed = [j for j in summary.jobs if j.status in ("failed", "interrupted")]
    pruned = [j for j in done if j.status == "pruned"]
    done = [j for j in done if j.status != "pruned"]
    ys = [j.value(summary.objective) for j in done + pruned]
    low, high = min(ys), max(ys)
    floor = low - 0.05 * (high - low or 1.0)
    cols = {1: 1, 2: 2, 3: 3, 4: 2}.get(len(params), 3)
    rows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, params, strict=False):
        every = [j.overrides.get(key, "") for j in summary.jobs]
        numbers = _numeric(every)
        if numbers is not None:
            positions = dict(zip(every, numbers, strict=True))
            if min(numbers) > 0 and (key in log_keys or max(numbers) / min(numbers) >= 100):
                ax.set_xscale("log")
            elif all(n.is_integer() for n in numbers):  # epochs, widths: no 2.5 ticks
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        else:  # categories (lists, names)
            by_job = sorted(summary.jobs, key=lambda j: job_sort_key(j.name))
            labels = _category_order(list(dict.fromkeys(j.overrides.get(key, "") for j in by_job)))
            positions = {v: float(i) for i, v in enumerate(labels)}
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        x = [positions[j.overrides.get(key, "")] for j in done]
        ax.scatter(x, ys[: len(done)], s=28, alpha=0.8, label="completed")
        if pruned:
            xp = [positions[j.overrides.get(key, "")] for j in pruned]
            ax.scatter(
                xp, ys[len(done) :], s=28, facecolors="none", edgecolors="tab:gray", label="pruned (best so far)"
            )
        if failed:
            xf = [positions[j.overrides.get(key, "")] for j in failed]
            ax.scatter(xf, [floor] * len(xf), marker="x", color="tab:red", label="failed (no value)")
        best = summary.best
        if best is not None:
            ax.scatter([positions[best.overrides.get(key, "")]], [best.value(summary.objective)], marker="*", s=180,
                       color="gold", edgecolor="black", zorder=3, label="best")  # fmt: skip
        ax.set_xlabel(key)
        ax.set_ylabel(summary.objective)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{summary.sweep_dir.name}: {summary.counts_text()}; {summary.epochs()} epochs", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def write_summary(sweep_dir: str | Path, plot: bool = True) -> SweepSummary:
    """Write sweep_summary.{csv,md,png} (and the by-config csv when seeds repeat) atomically.

    Several sweeper workers may share one sweep dir (one Optuna study) and each writes the summary
    when it stops: reading the job dirs and writing happen under one lock, so whoever writes last
    has read the latest results, and the summary left behind covers every finished trial.
    """
    with _summary_lock(Path(sweep_dir)):
        summary = summarize(sweep_dir)
        out = summary.sweep_dir
        atomic_write_text(out / CSV_NAME, _csv_text(job_rows(summary)))
        if summary.groups:
            atomic_write_text(out / BY_CONFIG_NAME, _csv_text(group_rows(summary)))
        png = out / PNG_NAME if plot and plot_objective(summary, out / PNG_NAME) else None
        atomic_write_text(out / MD_NAME, markdown(summary, png))
    return summary


@contextlib.contextmanager
def _summary_lock(sweep_dir: Path) -> Iterator[None]:
    import filelock

    lock, held = filelock.FileLock(sweep_dir / ".sweep_summary.lock"), False
    # Not for a missing dir: filelock would create it for its lock file; summarize() says what is wrong.
    if sweep_dir.is_dir():
        with contextlib.suppress(OSError):  # a read-only sweep dir: nothing to guard
            lock.acquire()
            held = True
    try:
        yield
    finally:
        if held:
            lock.release()


class SweepSummaryCallback(Callback):
    """Hydra callback: write the sweep summary when a multirun ends (every sweeper and launcher)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summary = write_summary(sweep_dir)
        except Exception:  # the jobs' results are on disk already; a summary problem must not hide them
            log.exception("Could not write the sweep summary; run python -m fmnist_tl.summarize %s", sweep_dir)
            return
        best = summary.best
        log.info(
            "Sweep summary: %s%s",
            sweep_dir / MD_NAME,
            f" (best: job {best.name}, {summary.objective}={best.value(summary.objective):.4f})" if best else "",
        )
