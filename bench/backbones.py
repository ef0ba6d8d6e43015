"""Per-backbone cost: `python -m bench --backbones resnet50,convnext_tiny,... [--images N]`.

For each backbone, in a process of its own (so that its peak RSS is its own): the model as
fmnist_tl builds it (random init: speed does not depend on weight values; this machine is
offline), at the image size its weights expect; then
- extraction img/s: uint8 28x28 images through the model's preprocessing and backbone, as the
  feature cache's torch fp32 path runs them (eval, inference mode, channels_last, batches of 16,
  one warm-up batch first);
- GFLOP per image: torch.utils.flop_counter.FlopCounterMode over one image's forward (2 FLOP per
  multiply-add; convolutions and matmuls, which are nearly all of it);
- peak RSS of that process (model, activations and the Python runtime).
Writes bench/results/<date>-backbones.json: {"date", "command", "machine", "rows", "notes"}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fmnist_tl.core import atomic_write_json

REPO = Path(__file__).resolve().parent.parent
BATCH = 16


def measure(name: str, images: int) -> dict[str, Any]:
    """One backbone's extraction rate and FLOPs, in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fmnist_tl.training import TransferClassifier

    torch.manual_seed(0)
    model = TransferClassifier(backbone=name, weights=None).eval()
    size = int(model.hparams.image_size)
    data = torch.randint(0, 256, (max(images, BATCH), 1, 28, 28), dtype=torch.uint8)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        # MultiheadAttention's inference fast path is one fused op the counter does not see.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with counter:
                model.embed(model.preprocess(data[:1]))
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        model.embed(model.preprocess(data[:BATCH]))  # warm-up: allocator, kernel selection
        start = time.perf_counter()
        for i in range(0, len(data), BATCH):
            model.embed(model.preprocess(data[i : i + BATCH]))
        seconds = time.perf_counter() - start
    return {
        "backbone": name,
        "image_size": size,
        "feature_dim": int(model.head[0].in_features),
        "params_m": round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 2),
        "img_per_s": round(len(data) / seconds, 1),
        "gflop_per_image": round(counter.get_total_flops() / 1e9, 3),
    }


def machine() -> dict[str, Any]:
    import torch

    from fmnist_tl.core import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def run_one(name: str, images: int) -> dict[str, Any]:
    """`measure` in a child process; its own peak RSS from the kernel's accounting (wait4)."""
    cmd = [sys.executable, "-m", "bench.backbones", "--one", name, "--images", str(images)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()  # the child reports its own peak RSS (see main)
    if proc.returncode != 0:
        return {"backbone": name, "error": (err.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.strip().splitlines()[-1])


def run(names: list[str], images: int, results_dir: Path, argv: list[str]) -> dict[str, Any]:
    load_start = os.getloadavg()
    rows = []
    for name in names:
        print(f"[bench backbones] {name} ...", file=sys.stderr, flush=True)
        rows.append(run_one(name, images))
    report = {
        "date": dt.date.today().isoformat(),
        "command": "python -m bench " + " ".join(argv),
        "machine": machine(),
        "rows": rows,
        "notes": (
            f"Random-init weights at each backbone's default image size (its weights' crop size); {images} "
            f"uint8 images per backbone, batches of {BATCH}, torch fp32 on the CPU, one process per backbone. "
            f"Load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} "
            f"({machine()['cores']} cores): a busy machine gives pessimistic rates."
        ),
    }
    path = results_dir / f"{report['date']}-backbones.json"
    atomic_write_json(path, report)
    print(table(report))
    print(f"wrote {path}", file=sys.stderr)
    return report


def table(report: dict[str, Any]) -> str:
    header = ["backbone", "image px", "features", "params (M)", "img/s", "GFLOP/image", "peak RSS (GB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['backbone']} | error: {r['error']} |" + " |" * 5)
            continue
        cells = [r["backbone"], r["image_size"], r["feature_dim"], r["params_m"], r["img_per_s"]]
        cells += [r["gflop_per_image"], r["peak_rss_gb"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backbones")
    parser.add_argument("--one", required=True)
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args(argv)
    import resource

    row = measure(args.one, args.images)
    row["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
