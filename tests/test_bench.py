"""The benchmark's judging and table: a failed run never counts as meeting a target."""

from __future__ import annotations

import copy

from bench.run import TARGETS, judge, markdown, median_round


def report(cold_returncode: int = 0) -> dict:
    run = {"returncode": 0, "wall_s": 30.0, "cores_busy": 1.0, "peak_rss_gb": 1.5, "val_acc": 0.8, "test_acc": 0.8}
    return {
        "date": "2026-11-28",
        "mode": "full",
        "machine": {
            "cpu": "test",
            "cores": 2,
            "torch": "x",
            "device": "cpu",
            "bf16": True,
            "load_average_start": [0.1] * 3,
        },
        "load_average_end": [0.1] * 3,
        "throughput": {
            "tutorial": {"img_per_s": 10.0, "batch_size": 64, "cores_busy": 2.0, "images": 512},
            "ours": {
                "img_per_s": 90.0,
                "batch_size": 16,
                "cores_busy": 2.0,
                "precision": "bf16",
                "compile_and_first_batch_s": 8.0,
            },
        },
        "ratio": 9.0,
        "head_epoch": {
            "images": 55000,
            "batch_size": 64,
            "steps": 860,
            "torch_threads": 1,
            "cores_busy": [1.0],
            "seconds": 2.0,
        },
        "runs": {"cold": {**copy.deepcopy(run), "returncode": cold_returncode, "wall_s": 600.0}, "warm": run},
    }


def test_all_targets_met_when_every_figure_is_inside():
    r = report()
    r["targets"] = judge(r)
    assert all(r["targets"].values())
    assert "NOT met" not in markdown(r)


def test_a_failed_run_meets_none_of_its_targets_and_says_so():
    r = report(cold_returncode=1)
    r["targets"] = judge(r)
    assert r["targets"]["cold_run_s"] is False and r["targets"]["cold_rss"] is False
    assert r["targets"]["warm_run_s"] is True
    assert "cold cache **FAILED (exit 1)**" in markdown(r)


def test_ratio_below_target_is_not_met():
    r = report()
    r["ratio"] = TARGETS["extraction_ratio"] - 0.1
    r["targets"] = judge(r)
    assert r["targets"]["extraction_ratio"] is False
    assert "| extraction speed-up (b)/(a) | 7.9x | >= 8x | NOT met |" in markdown(r)


def test_alternating_rounds_report_the_median_and_every_ratio():
    assert median_round([{"img_per_s": x} for x in (5.0, 9.0, 7.0)])["img_per_s"] == 7.0
    assert median_round([{"img_per_s": x} for x in (5.0, 9.0)])["img_per_s"] == 5.0  # the lower middle
    r = report()
    r["throughput"]["rounds"] = {"ratios": [7.2, 7.4, 9.1]}
    r["targets"] = judge(r)
    assert "the median of 3 alternating rounds (ratios per round: 7.2x, 7.4x, 9.1x)" in markdown(r)
