"""The GPU check of issue 10, for a lent device: `bash bench/gpu_check.sh` runs this.

1. The cold full run on the GPU (`python -m fmnist_tl.train`, 70k images extracted, 10 head epochs,
   test), which the H200 run of 2026-11-28 failed at its test stage, and the warm run after it.
2. The head epoch over 55k cached features (median after a warm-up epoch), with the features on the
   device (DeviceBatches); then one more epoch under `torch.cuda.set_sync_debug_mode("warn")`, which
   counts the host syncs an epoch makes (target: none per step).

Writes summary.json (and the runs' logs) under --out and prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.run import head_epoch_time, machine_info, run_train  # noqa: E402


def count_syncs(data_dir: Path, cache_dir: Path, device: torch.device) -> dict[str, int]:
    """Host syncs in one head epoch (after the warm-up epoch) as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            timing = head_epoch_time(data_dir, cache_dir, device, epochs=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    return {
        "syncs_in_two_epochs": len(syncs),
        "steps_per_epoch": timing["steps"],
        "examples": sorted({str(w.message)[:160] for w in syncs})[:5],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True, help="folder with the four Fashion-MNIST *-ubyte.gz files")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fmnist_gpu_check"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data_dir = args.workdir / "data"
    overrides = [
        f"paths.root_dir={args.workdir}",
        f"data.data_dir={data_dir}",
        f"data.mirror_dir={args.data.resolve()}",
        "model.weights=null",
        "trainer.max_epochs=10",
        "callbacks.early_stopping=null",
        "callbacks.rich_progress_bar=null",  # a log file, not a terminal
    ]
    summary: dict = {"machine": {k: v for k, v in machine_info(device, "random-init").items() if k != "cpu_flags"}}
    runs = {}
    for name in ("cold", "warm"):
        runs[name] = run_train(args.workdir, name, overrides)
        (args.out / f"{name}.log").write_text(Path(runs[name]["log"]).read_text()[-200_000:])
    summary["runs"] = runs
    cache = args.workdir / "cache" / "features"
    summary["head_epoch"] = head_epoch_time(data_dir, cache, device)
    summary["head_epoch_syncs"] = count_syncs(data_dir, cache, device)
    summary["targets"] = {
        "cold_run_completed": runs["cold"]["returncode"] == 0,
        "cold_run_under_15_min": runs["cold"]["returncode"] == 0 and runs["cold"]["wall_s"] < 900,
        "head_epoch_under_0.5_s": summary["head_epoch"]["seconds"] <= 0.5,
    }
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary, indent=2, default=str))
    return 0 if runs["cold"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
