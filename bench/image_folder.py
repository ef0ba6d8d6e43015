"""Own-image folders (data=image_folder): decode, reopen, extraction and memory, measured on generated JPEGs.

    python -m bench.image_folder [--workdir /tmp/image-folder-bench] [--out bench/results/DATE-image-folder.json]

1. **Decode**: 10,000 generated JPEGs of 500x375 (10 classes) decoded into the store at 224 px on
   every core; wall time and peak memory (this process's RSS; it and its workers' summed PSS,
   sampled every 0.1 s: forked workers share the parent's pages, so summed RSS would count them
   once per worker). Target
   (issue 27): <= 60 s on 2 cores, peak RSS <= 1.5 GB.
2. **Reopen**: a second datamodule's setup on the same folder (the store found, nothing decoded).
   Target <= 2 s.
3. **Extraction**: the same backbone at the same image size over N images, from the store
   (uint8 (N, 3, S, S) rows read from disk) and on the Fashion-MNIST path (uint8 (N, 1, 28, 28) in
   memory, resized on the fly), alternated in one process, best of the repeats. Target: the store
   within 10% of the Fashion-MNIST path's img/s.
4. **Memory**: 10,000 and 40,000 small generated JPEGs, stored at 32 px; a fresh process opens the
   store and extracts the training split's features at 32 px through FeatureExtractor, with
   `--memory-backbone` (default `pool`: global average pooling, no network, so the figure is the
   data path's and the run takes minutes on a loaded machine; a network adds its features, N x D
   float32, accounted for in the extrapolation); its peak RSS. Target:
   growth <= 0.5 GB, extrapolating to <= 4 GB at 100,000 images at 224 px.

Each phase runs in its own process, so each peak RSS is that phase's. The machine's CPU model and
load average are recorded with the figures: on a shared machine they explain the noise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CLASSES = 10


def _make_jpegs(job: tuple[str, int, int, int, int]) -> None:
    from PIL import Image

    root, start, end, width, height = job
    for i in range(start, end):
        rng = np.random.default_rng(i)
        # Photo-like: a smooth colour gradient and mild noise (pure noise would compress far worse).
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        colour = rng.uniform(0, 255, (2, 3)).astype(np.float32)
        t = ((x / width + y / height) / 2)[..., None]
        pixels = colour[0] * (1 - t) + colour[1] * t + rng.normal(0, 12, (height, width, 3))
        folder = Path(root) / f"class{i % CLASSES:02d}"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=85)


def generate(root: Path, count: int, width: int, height: int) -> float:
    """`count` JPEGs of width x height in CLASSES class folders (kept between runs)."""
    marker = root / f".complete-{count}-{width}x{height}"
    if marker.exists():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir(parents=True)
    started = time.perf_counter()
    step = 500
    jobs = [(str(root), s, min(s + step, count), width, height) for s in range(0, count, step)]
    with multiprocessing.get_context("fork").Pool() as pool:
        pool.map(_make_jpegs, jobs)
    marker.touch()
    return time.perf_counter() - started


def peak_rss_mb() -> dict[str, float]:
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


class PssSampler(threading.Thread):
    """Peak of this process's and its children's summed PSS (shared pages counted once), sampled."""

    def __init__(self, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.every, self.peak_kb, self.done = every, 0, threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.done.wait(self.every):
            self.peak_kb = max(self.peak_kb, _pss_kb(me) + sum(_pss_kb(k) for k in _children(me)))


# --- phases, each in its own process ---------------------------------------------------------


def phase_decode(root: str, cache: str, size: int) -> dict[str, Any]:
    from fmnist_tl.data import ImageFolderDataModule

    dm = ImageFolderDataModule(root, stored_size=size, cache_dir=cache, progress=False)
    sampler = PssSampler()
    sampler.start()
    started = time.perf_counter()
    dm.prepare_data()
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    return {
        "seconds": round(seconds, 2),
        "decoded": dm.store.decoded,
        "images": dm.store.count,
        "workers": os.cpu_count(),
        # this process (imports included); and it with its decode workers, shared pages counted once
        **peak_rss_mb(),
        "peak_pss_with_workers_mb": round(sampler.peak_kb / 1024, 1),
    }


def phase_reopen(root: str, cache: str, size: int) -> dict[str, Any]:
    from fmnist_tl.data import ImageFolderDataModule

    dm = ImageFolderDataModule(root, stored_size=size, cache_dir=cache, progress=False)
    started = time.perf_counter()
    dm.setup()
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "decoded": dm.store.decoded, **peak_rss_mb()}


def _extractor(backbone: str, size: int):
    import torch
    import torchvision

    from fmnist_tl.data import ImagePreprocess
    from fmnist_tl.features import FeatureExtractor

    torch.manual_seed(0)
    if backbone == "pool":  # no network: the data path's own cost and memory (global average pooling)
        net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    else:
        net = torchvision.models.get_model(backbone, weights=None)
        setattr(net, "fc" if hasattr(net, "fc") else "classifier", torch.nn.Identity())
    return FeatureExtractor(net, ImagePreprocess(size), precision="32", compile=False, progress=False)


def phase_extract(root: str, cache: str, size: int, backbone: str, count: int, repeats: int) -> dict[str, Any]:
    import torch

    from fmnist_tl.data import ImageFolderDataModule

    dm = ImageFolderDataModule(root, stored_size=size, cache_dir=cache, progress=False, val_size=0.05, test_size=0.05)
    dm.setup()
    store_images = dm.split_tensors("train")[0]
    store_images = type(store_images)(store_images.store, store_images.rows[:count])
    fm_images = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8)
    extract = _extractor(backbone, size)
    extract(fm_images[:32])  # warm-up: first-call allocations
    rates: dict[str, list[float]] = {"fashion_mnist_path": [], "store": []}
    for _ in range(repeats):
        for name, images in (("fashion_mnist_path", fm_images), ("store", store_images)):
            started = time.perf_counter()
            extract(images)
            rates[name].append(count / (time.perf_counter() - started))
    best = {k: max(v) for k, v in rates.items()}
    return {
        "backbone": backbone,
        "image_size": size,
        "images": count,
        "repeats": repeats,
        "fashion_mnist_img_per_s": round(best["fashion_mnist_path"], 1),
        "store_img_per_s": round(best["store"], 1),
        "store_over_fashion_mnist": round(best["store"] / best["fashion_mnist_path"], 3),
        "all_rates": {k: [round(r, 1) for r in v] for k, v in rates.items()},
    }


def phase_memory(root: str, cache: str, size: int, backbone: str) -> dict[str, Any]:
    from fmnist_tl.data import ImageFolderDataModule

    dm = ImageFolderDataModule(root, stored_size=size, cache_dir=cache, progress=False)
    dm.setup()
    images, labels = dm.split_tensors("train")
    started = time.perf_counter()
    feats = _extractor(backbone, size)(images)
    return {
        "images": dm.store.count,
        "train_images": len(labels),
        "feature_dim": int(feats.shape[1]),
        "extract_seconds": round(time.perf_counter() - started, 1),
        **peak_rss_mb(),
    }


PHASES = {"decode": phase_decode, "reopen": phase_reopen, "extract": phase_extract, "memory": phase_memory}


def run_phase(name: str, **kwargs: Any) -> dict[str, Any]:
    """One phase in a fresh interpreter: its own peak RSS, nothing left warm from another phase."""
    command = [sys.executable, "-m", "bench.image_folder", "--phase", name, "--args", json.dumps(kwargs)]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    print(name, json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/image-folder-bench"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--decode-images", type=int, default=10_000)
    parser.add_argument("--extract-images", type=int, default=128)
    parser.add_argument("--extract-size", type=int, default=64)
    # "pool": global average pooling instead of a network, for a loaded machine; or any torchvision name
    parser.add_argument("--memory-backbone", default="pool")
    parser.add_argument("--memory-images", default="10000,40000")
    parser.add_argument("--keep", action="store_true", help="keep the generated images and stores")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        print(json.dumps(PHASES[args.phase](**json.loads(args.args))))
        return 0

    from fmnist_tl.core import atomic_write_text, cpu_model

    work = args.workdir
    load_start = os.getloadavg()
    record: dict[str, Any] = {
        "benchmark": "image_folder (issue 27): python -m bench.image_folder",
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_start": [round(x, 2) for x in load_start],
        },
        "targets": {
            "decode_10k_500x375_seconds": 60,
            "decode_peak_rss_mb": 1536,
            "reopen_seconds": 2,
            "extraction_store_over_fashion_mnist_min": 0.9,
            "rss_growth_10k_to_40k_mb": 512,
            "rss_at_100k_224px_mb_extrapolated": 4096,
        },
    }
    photos = work / "photos"
    generated = generate(photos, args.decode_images, 500, 375)
    cache = str(work / "store")
    shutil.rmtree(cache, ignore_errors=True)
    decode = run_phase("decode", root=str(photos), cache=cache, size=224)
    decode["generate_seconds"] = round(generated, 1)
    decode["store_mb"] = round(args.decode_images * 3 * 224 * 224 / 2**20, 1)
    record["decode_224px"] = decode
    record["reopen_224px"] = run_phase("reopen", root=str(photos), cache=cache, size=224)
    size = args.extract_size
    run_phase("decode", root=str(photos), cache=cache, size=size)
    record["extraction"] = run_phase(
        "extract", root=str(photos), cache=cache, size=size, backbone="resnet18", count=args.extract_images, repeats=3
    )
    memory: dict[str, Any] = {}
    for count in (int(n) for n in args.memory_images.split(",")):
        small = work / f"small-{count}"
        generate(small, count, 80, 60)
        small_cache = str(work / f"store-small-{count}")
        shutil.rmtree(small_cache, ignore_errors=True)
        dec = run_phase("decode", root=str(small), cache=small_cache, size=32)
        mem = run_phase("memory", root=str(small), cache=small_cache, size=32, backbone=args.memory_backbone)
        memory[str(count)] = {"decode": dec, "open_and_extract": mem}
    counts = sorted(memory, key=int)
    lo, hi = memory[counts[0]]["open_and_extract"], memory[counts[-1]]["open_and_extract"]
    growth = hi["peak_rss_mb"] - lo["peak_rss_mb"]
    per_image_kb = growth * 1024 / (int(counts[-1]) - int(counts[0]))
    # What grows with the image count is per image (features, labels, file lists), not per pixel: rows
    # are read a batch at a time. At 224 px only the batch being read grows (16 x 3 x 224 x 224 bytes).
    batch_mb = 16 * 3 * 224 * 224 / 2**20
    # Features of a real backbone at 100k images: resnet50's 2048 float32 per image.
    features_100k_mb = 100_000 * 2048 * 4 / 2**20
    record["memory_32px"] = {
        "backbone": args.memory_backbone,
        "resnet50_features_at_100k_mb": round(features_100k_mb, 1),
        **memory,
        "rss_growth_mb": round(growth, 1),
        "growth_per_image_kb": round(per_image_kb, 3),
        "rss_at_100k_224px_mb_extrapolated": round(
            lo["peak_rss_mb"] + per_image_kb * (100_000 - int(counts[0])) / 1024 + batch_mb + features_100k_mb, 1
        ),
    }
    record["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    record["verdict"] = {
        "decode_seconds_ok": decode["seconds"] <= 60,
        "decode_rss_ok": decode["peak_pss_with_workers_mb"] <= 1536,
        "reopen_ok": record["reopen_224px"]["seconds"] <= 2,
        "extraction_ok": record["extraction"]["store_over_fashion_mnist"] >= 0.9,
        "rss_growth_ok": growth <= 512,
        "extrapolation_ok": record["memory_32px"]["rss_at_100k_224px_mb_extrapolated"] <= 4096,
    }
    text = json.dumps(record, indent=2) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
