"""The benchmark's targets, and a `python -m bench` results file judged against them.

Pure Python (no torch), so `bench/render.py` judges every results file, old ones included, against
the targets in force, and the tables never show a verdict against a target since dropped.

The one extraction target that means the same on every CPU is the share of the machine's own
ceiling (its best GEMM rate, among the precisions that passed the fidelity gate, / 8.2 GFLOP per
ResNet50 image): a ratio to the tutorial pipeline is capped by the machine (an AVX2 CPU reached
5.1x the tutorial at 111% of its ceiling, bench/results/2026-11-30.json; an AVX512-BF16 one 8.2x
at 78%, 2026-12-01.json). So extraction end to end (the choice's probe, export, quantisation and
gate included) must reach CEILING_SHARE of the ceiling, and the cold run's target follows:
70,000 images at that rate plus the fixed cost, what a warm run does (start, 10 head epochs,
test, report) at its own target.
"""

from __future__ import annotations

from typing import Any

CEILING_SHARE = 0.8
IMAGES = 70000  # Fashion-MNIST's train and test splits: what a cold run extracts
TARGETS = {
    "end_to_end_of_ceiling": CEILING_SHARE,  # end-to-end extraction img/s / the ceiling's img/s
    "head_epoch_s": 3.0,
    "warm_run_s": 90.0,
    "peak_rss_gb": 4.0,
}


def end_to_end_of_ceiling(report: dict[str, Any]) -> float | None:
    """The cold run's extraction img/s, end to end, as a share of the ceiling's img/s; None without either."""
    rate = (report.get("end_to_end") or {}).get("img_per_s")
    ceiling = (report.get("ceiling") or {}).get("img_per_s")
    return round(rate / ceiling, 3) if rate and ceiling else None


def cold_run_limit(report: dict[str, Any]) -> float | None:
    """The cold run's wall-time target on this machine: IMAGES / (CEILING_SHARE x the ceiling's img/s)
    + the warm run's target; None where no ceiling was measured."""
    ceiling = (report.get("ceiling") or {}).get("img_per_s")
    if not ceiling:
        return None
    return round(IMAGES / (CEILING_SHARE * ceiling) + TARGETS["warm_run_s"], 1)


def judge(report: dict[str, Any]) -> dict[str, bool | None]:
    """Which targets the report meets (None: not judged); a run that failed meets none of its targets.

    The end-to-end share and the run wall times are for the full data (`mode: full`) only."""
    runs, full = report.get("runs") or {}, report.get("mode") == "full"

    def run_ok(name: str, key: str, limit: float | None, applies: bool = True) -> bool | None:
        run = runs.get(name)
        if run is None or limit is None or not applies:
            return None
        return run["returncode"] == 0 and run[key] < limit

    share = end_to_end_of_ceiling(report)
    cold_ok = runs.get("cold", {}).get("returncode") == 0
    head = (report.get("head_epoch") or {}).get("seconds")
    return {
        "end_to_end_of_ceiling": (share >= CEILING_SHARE and cold_ok) if share is not None and full else None,
        "head_epoch_s": head < TARGETS["head_epoch_s"] if head is not None else None,
        "cold_run_s": run_ok("cold", "wall_s", cold_run_limit(report), full),
        "warm_run_s": run_ok("warm", "wall_s", TARGETS["warm_run_s"], full),
        "cold_rss": run_ok("cold", "peak_rss_gb", TARGETS["peak_rss_gb"]),
        "warm_rss": run_ok("warm", "peak_rss_gb", TARGETS["peak_rss_gb"]),
    }
