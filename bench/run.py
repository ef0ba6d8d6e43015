"""fmnist_tl speed benchmark: `python -m bench [--quick]` (or `python bench/run.py`, `make bench`).

In one command it measures, on this machine, in this run:

1. ResNet50 forward throughput at 224 px on the same Fashion-MNIST images for
   (a) the typical tutorial pipeline: torchvision `FashionMNIST` with per-sample PIL
       `Resize(224)`, `Grayscale(3)`, `ToTensor`, `Normalize`, a `DataLoader`, float32; and
   (b) fmnist_tl's extraction path (`fmnist_tl.features.FeatureExtractor`): uint8 batches
       resized on the device, bf16 autocast where the hardware does bf16, channels_last,
       `torch.compile` with inductor freezing;
   plus the steps in between (ablation), each as a ratio to (a).
2. The time of one head-training epoch over 55k cached features (Lightning, as in training).
3. Wall time and peak RSS of `python -m fmnist_tl.train` on the real data, 10 epochs, with a
   cold feature cache and again with a warm one (`--quick`: a 6k/2k-image subset).

The weights are a random-init ResNet50 (`model.weights=null`): this machine is offline, and
throughput does not depend on the weight values. It prints a markdown table and writes
bench/results/<date>[-quick].json. Figures from a shared, busy machine are pessimistic; the
ratios (both sides measured back to back in one process) are the robust part.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/run.py` from a fresh clone, without installing
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset, TensorDataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from fmnist_tl.data import IMAGENET_MEAN, IMAGENET_STD, FashionMNISTDataModule, ImagePreprocess  # noqa: E402
from fmnist_tl.features import ExtractionSettings, FeatureExtractor  # noqa: E402
from fmnist_tl.train import build  # noqa: E402
from fmnist_tl.utils import atomic_write_json, bf16_supported, compose_config  # noqa: E402

TARGETS = {
    "extraction_ratio": 8.0,  # (b) / (a), at least
    "head_epoch_s": 3.0,
    "warm_run_s": 90.0,
    "cold_run_s": 15 * 60.0,
    "peak_rss_gb": 4.0,
}
WEIGHTS_NOTE = "random-init ResNet50 (model.weights=null; offline); throughput does not depend on weight values"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "bf16": bf16_supported("gpu" if device.type == "cuda" else "cpu"),
        "load_average_start": os.getloadavg(),
        "weights": WEIGHTS_NOTE,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resnet50_backbone() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    net.fc = nn.Identity()
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# 1. Throughput


def tutorial_throughput(data_dir: Path, n: int, device: torch.device, batch_size: int) -> dict[str, Any]:
    """(a) What most Fashion-MNIST transfer-learning tutorials do, float32 end to end."""
    tf = transforms.Compose(
        [
            transforms.Resize(224),
            transforms.Grayscale(num_output_channels=3),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = torchvision.datasets.FashionMNIST(str(data_dir), train=True, transform=tf, download=False)
    # One extra batch first, not timed: allocator and thread-pool warm-up, as for (b).
    loader = DataLoader(Subset(dataset, range(n + batch_size)), batch_size=batch_size, num_workers=0)
    model = resnet50_backbone().to(device)
    seen, clock = 0, None
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == 1:
                sync(device)
                clock = Clock()
            model(x.to(device))
            seen += len(x) if i >= 1 else 0
    sync(device)
    return {**clock.result(seen), "batch_size": batch_size}


class Clock:
    """Wall time plus the CPU time this process got: on a shared machine, how many cores it really had."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def result(self, images: int) -> dict[str, Any]:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return {
            "images": images,
            "seconds": round(wall, 2),
            "img_per_s": round(images / wall, 2),
            "cpu_seconds": round(cpu, 2),
            "cores_busy": round(cpu / wall, 2),
        }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_throughput(
    images: torch.Tensor, device: torch.device, batch_size: int, bf16_cl: bool, precision: str
) -> dict[str, Any]:
    """Ablation steps between (a) and (b): batched on-device preprocessing, eager."""
    net = resnet50_backbone().to(device)
    pre = ImagePreprocess(224).to(device)
    if bf16_cl:
        net = net.to(memory_format=torch.channels_last)
    use_bf16 = bf16_cl and precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def step(x: torch.Tensor) -> None:
        x = pre(x.to(device, non_blocking=True))
        if bf16_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        net(x)

    with torch.inference_mode(), autocast:
        step(images[:batch_size])
        sync(device)
        clock = Clock()
        for i in range(0, len(images), batch_size):
            step(images[i : i + batch_size])
        sync(device)
    return {**clock.result(len(images)), "batch_size": batch_size}


def compiled_extractor(images: torch.Tensor, device: torch.device, precision: str) -> tuple[FeatureExtractor, float]:
    """(b) fmnist_tl.features.FeatureExtractor as training runs it (default batch size), compiled once.

    Returns the extractor and the seconds its one-off compile + first batch took.
    """
    extractor = FeatureExtractor(
        resnet50_backbone(), ImagePreprocess(224), device=device, precision=precision, compile=True, progress=False
    )
    start = time.perf_counter()
    extractor(images[: extractor.batch_size])  # compiles
    return extractor, round(time.perf_counter() - start, 1)


def ours_throughput(extractor: FeatureExtractor, images: torch.Tensor) -> dict[str, Any]:
    clock = Clock()
    extractor(images)
    return {
        **clock.result(len(images)),
        "compiled": extractor.compiled_used,
        "precision": extractor.precision,
        "batch_size": extractor.batch_size,
    }


def lower_median(values: list[Any], key: Any = None) -> Any:
    """The median item (the lower middle one for an even count), so it is always a measured value."""
    return sorted(values, key=key)[(len(values) - 1) // 2]


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput."""
    return lower_median(rounds, key=lambda r: r["img_per_s"])


# --------------------------------------------------------------------------------------------
# 2. Head epoch over cached features


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cores_busy: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t, self._cpu = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._t)
        self.cores_busy.append((time.process_time() - self._cpu) / self.seconds[-1])


def cached_train_features(cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    import safetensors.torch

    for manifest in sorted(cache_dir.glob("train-*.json")):
        meta = json.loads(manifest.read_text())
        if meta.get("shape", [0])[0] == 55000:
            tensors = safetensors.torch.load_file(str(manifest.with_suffix(".safetensors")))
            return tensors["features"], tensors["labels"]
    return None


def head_epoch_time(data_dir: Path, cache_dir: Path, precision: str, epochs: int = 3) -> dict[str, Any]:
    """One head epoch over 55k features, through the same datamodule, model and Trainer as training."""
    found = cached_train_features(cache_dir)
    source = "cached train split of the cold run"
    if found is None:  # --quick caches only a subset; the head's cost does not depend on the values
        g = torch.Generator().manual_seed(0)
        found = (torch.rand(55000, 2048, generator=g).to(torch.bfloat16), torch.randint(0, 10, (55000,), generator=g))
        source = "random 55000x2048 bf16 features (--quick caches a subset only)"
    feats, labels = found
    # The model, optimizer and batch size exactly as `python -m fmnist_tl.train model.weights=null` builds them.
    cfg = compose_config("train", ["model.weights=null"])
    batch_size = int(cfg.data.batch_size)
    dm = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=batch_size, eval_batch_size=256)
    dm.data_train = TensorDataset(feats, labels)
    dm.data_val = TensorDataset(feats[:256], labels[:256])
    model = build(cfg.model, _recursive_=False)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    threads = torch.get_num_threads()
    head_threads = ExtractionSettings.from_config(cfg.features).head_threads  # as FeatureCache sets it
    if head_threads:
        torch.set_num_threads(head_threads)
    try:
        trainer.fit(model, datamodule=dm)
    finally:
        torch.set_num_threads(threads)
    steady = sorted(timer.seconds[1:] or timer.seconds)
    return {
        "features": source,
        "images": len(labels),
        "batch_size": batch_size,
        "steps": -(-len(labels) // batch_size),
        "optimizer": dict(model.hparams.optimizer),
        "epoch_seconds": [round(s, 2) for s in timer.seconds],
        "cores_busy": [round(c, 2) for c in timer.cores_busy],
        "seconds": round(steady[len(steady) // 2], 2),  # median after the first (warm-up) epoch
        "torch_threads": head_threads,
    }


# --------------------------------------------------------------------------------------------
# 3. Full runs


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass  # exited between poll() and the read
    return 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_train(workdir: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    run_dir = workdir / "runs" / name
    args = [sys.executable, "-m", "fmnist_tl.train", *overrides, f"hydra.run.dir={run_dir}"]
    log(f"{name}: {' '.join(args[1:])}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run_dir.mkdir(parents=True, exist_ok=True)
    cpu_before = _children_cpu()
    start = time.perf_counter()
    peak_kb = 0
    with open(workdir / f"{name}.log", "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        # VmHWM is the peak RSS of the child's own address space since its exec. (ru_maxrss would
        # also count this big parent process, which the child is a fork of until it execs.)
        while proc.poll() is None:
            peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
            time.sleep(0.2)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu_before
    result: dict[str, Any] = {
        "returncode": proc.returncode,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cores_busy": round(cpu / wall, 2),
        "peak_rss_gb": round(peak_kb * 1024 / 1e9, 2),
        "log": str(workdir / f"{name}.log"),
    }
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        m = json.loads(metrics_file.read_text())
        cache = m.get("feature_cache")
        result.update(
            {
                "val_acc": m.get("val/acc"),
                "test_acc": m.get("test/acc"),
                "epochs": m.get("epochs"),
                "precision": m.get("precision"),
                "feature_cache": {
                    split: {k: v.get(k) for k in ("status", "count", "seconds", "images_per_s", "compiled")}
                    for split, v in cache.items()
                }
                if isinstance(cache, dict)
                else cache,
            }
        )
    if proc.returncode != 0:
        tail = (workdir / f"{name}.log").read_text()[-3000:]
        log(f"{name} failed with exit code {proc.returncode}:\n{tail}")
    log(f"{name}: {result['wall_s']} s, peak RSS {result['peak_rss_gb']} GB")
    return result


# --------------------------------------------------------------------------------------------
# Report


def judge(report: dict[str, Any]) -> dict[str, bool | None]:
    """Which targets the report meets; a run that failed meets none of its targets."""
    runs, full = report["runs"], report["mode"] == "full"

    def run_ok(name: str, key: str, limit: float, applies: bool = True) -> bool | None:
        run = runs.get(name)
        if run is None or not applies:
            return None
        return run["returncode"] == 0 and run[key] < limit

    return {
        "extraction_ratio": report["ratio"] >= TARGETS["extraction_ratio"],
        "head_epoch_s": report["head_epoch"]["seconds"] < TARGETS["head_epoch_s"],
        "cold_run_s": run_ok("cold", "wall_s", TARGETS["cold_run_s"], full),
        "warm_run_s": run_ok("warm", "wall_s", TARGETS["warm_run_s"], full),
        "cold_rss": run_ok("cold", "peak_rss_gb", TARGETS["peak_rss_gb"]),
        "warm_rss": run_ok("warm", "peak_rss_gb", TARGETS["peak_rss_gb"]),
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def markdown(r: dict[str, Any]) -> str:
    m, t = r["machine"], r["throughput"]
    a, b = t["tutorial"]["img_per_s"], t["ours"]
    lines = [
        f"fmnist_tl benchmark, {r['date']}, mode {r['mode']}: {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}, device {m['device']}, bf16 {m['bf16']}, load average at start "
        f"{'/'.join(f'{x:.1f}' for x in m['load_average_start'])} (end "
        f"{'/'.join(f'{x:.1f}' for x in r['load_average_end'])}).",
        f"Weights: {WEIGHTS_NOTE}.",
        "",
        "| ResNet50 forward at 224 px, same images | img/s | vs tutorial | cores busy |",
        "| --- | ---: | ---: | ---: |",
        f"| (a) tutorial: per-sample PIL Resize/Grayscale/ToTensor/Normalize, DataLoader, float32, "
        f"batch {t['tutorial']['batch_size']} "
        f"| {a:.1f} | 1.0x | {t['tutorial']['cores_busy']:.2f} |",
    ]
    for label, key in (
        (f"batched uint8 resize on the device, float32, eager, batch {b['batch_size']}", "eager_fp32"),
        ("+ bf16 autocast + channels_last, eager", "eager_bf16_cl"),
    ):
        if key in t:
            row = t[key]
            speed = row["img_per_s"]
            lines.append(f"| {label} | {speed:.1f} | {speed / a:.1f}x | {row['cores_busy']:.2f} |")
    lines.append(
        f"| (b) fmnist_tl extraction: + torch.compile (inductor freezing), {b['precision']}, batch {b['batch_size']} "
        f"| {b['img_per_s']:.1f} | **{r['ratio']:.1f}x** | {b['cores_busy']:.2f} |"
    )
    lines += [
        "",
        f"Throughput on {t['tutorial']['images']} images for (a) and (b)"
        + (
            f", the median of {len(t['rounds']['ratios'])} alternating rounds (ratios per round: "
            + ", ".join(f"{x:.1f}x" for x in t["rounds"]["ratios"])
            + ")"
            if "rounds" in t
            else ""
        )
        + (f", {t['eager_fp32']['images']} for the eager steps" if "eager_fp32" in t else "")
        + f"; (b) excludes its one-off compile + first batch ({b['compile_and_first_batch_s']} s). "
        f"'cores busy' is the CPU time this process got per second of wall time, out of {m['cores']} cores: "
        "below that, other work on the machine took the rest.",
        "",
        "| measure | value | target | |",
        "| --- | ---: | ---: | --- |",
        f"| extraction speed-up (b)/(a) | {r['ratio']:.1f}x | >= {TARGETS['extraction_ratio']:.0f}x "
        f"| {verdict(r['targets']['extraction_ratio'])} |",
    ]
    h = r.get("head_epoch")
    if h:
        lines.append(
            f"| head epoch, {h['images']} cached features, batch {h['batch_size']} ({h['steps']} steps), "
            f"{h['torch_threads']} thread, {max(h['cores_busy']):.2f} cores busy "
            f"| {h['seconds']:.2f} s | < {TARGETS['head_epoch_s']:.0f} s | {verdict(r['targets']['head_epoch_s'])} |"
        )
    runs = r.get("runs", {})
    scope = "full data" if r["mode"] == "full" else "quick subset"
    for name in ("cold", "warm"):
        run = runs.get(name)
        if not run:
            continue
        rate = ""
        if name == "cold" and isinstance(run.get("feature_cache"), dict):
            total = sum(v["count"] for v in run["feature_cache"].values())
            secs = sum(v["seconds"] or 0 for v in run["feature_cache"].values())
            rate = f" (extraction {total} images in {secs:.0f} s = {total / secs:.0f} img/s incl. compile)"
        target_key = f"{name}_run_s"
        failed = f" **FAILED (exit {run['returncode']})**" if run["returncode"] != 0 else ""
        lines.append(
            f"| `python -m fmnist_tl.train`, {scope}, 10 epochs + test, {name} cache{rate}{failed}, "
            f"{run['cores_busy']:.2f} cores busy "
            f"| {run['wall_s']:.0f} s | < {TARGETS[target_key]:.0f} s | {verdict(r['targets'].get(target_key))} |"
        )
        lines.append(
            f"| peak RSS, {name} run | {run['peak_rss_gb']:.2f} GB | < {TARGETS['peak_rss_gb']:.0f} GB "
            f"| {verdict(r['targets'].get(f'{name}_rss'))} |"
        )
    if runs.get("cold") and runs.get("warm"):
        lines.append(f"| cold / warm wall time | {runs['cold']['wall_s'] / runs['warm']['wall_s']:.1f}x | | |")
        lines.append(
            f"| val / test accuracy (random-init backbone, warm run) | {runs['warm'].get('val_acc') or 0:.3f} / "
            f"{runs['warm'].get('test_acc') or 0:.3f} | | |"
        )
    if r["mode"] == "quick":
        lines += ["", "Quick mode: run wall-time targets are for the full data and are not judged here."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and a 6k/2k-image training subset")
    parser.add_argument("--images", type=int, help="images for the throughput comparison (default 512, quick 192)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating (a)/(b) rounds; the median is reported")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--workdir", type=Path, help="data, cache and run logs (default: a temp dir, removed)")
    parser.add_argument("--no-runs", action="store_true", help="skip the cold/warm python -m fmnist_tl.train runs")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    quick = args.quick
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    precision = "bf16" if bf16_supported("gpu" if device.type == "cuda" else "cpu") else "32"
    batch = 64
    n = args.images or (192 if quick else 512)
    n = max(batch, n - n % batch)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmnist_bench_"))
    own_workdir = args.workdir is None
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "mode": "quick" if quick else "full",
        "machine": machine_info(device),
        "command": "python -m bench" + (" --quick" if quick else ""),
    }
    started = time.perf_counter()
    if os.getloadavg()[0] > report["machine"]["cores"]:
        log(f"load average {os.getloadavg()[0]:.1f} > {report['machine']['cores']} cores: figures will be pessimistic")
    try:
        dm = FashionMNISTDataModule(data_dir=str(data_dir))
        dm.prepare_data()
        images = torchvision.datasets.FashionMNIST(str(data_dir), train=True, download=False).data[:n].unsqueeze(1)

        log("(b) compiling fmnist_tl's extraction ...")
        extractor, compile_s = compiled_extractor(images, device, precision)
        log(f"    compile + first batch {compile_s} s")
        # (a) and (b) alternate, so a burst of load elsewhere hits one round of each, not one side.
        tutorial, ours, ratios = [], [], []
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: (a) tutorial pipeline, then (b) fmnist_tl extraction, {n} images each")
            tutorial.append(tutorial_throughput(data_dir, n, device, batch))
            ours.append(ours_throughput(extractor, images))
            ratios.append(round(ours[-1]["img_per_s"] / tutorial[-1]["img_per_s"], 2))
            log(f"    (a) {tutorial[-1]['img_per_s']} img/s, (b) {ours[-1]['img_per_s']} img/s: {ratios[-1]}x")
        t = {
            "tutorial": median_round(tutorial),
            "ours": {**median_round(ours), "compile_and_first_batch_s": compile_s},
            "rounds": {"tutorial": tutorial, "ours": ours, "ratios": ratios},
        }
        n_steps = max(batch, (n // 4) - (n // 4) % batch)
        log(f"ablation: eager steps on {n_steps} images ...")
        ours_batch = t["ours"]["batch_size"]  # the eager steps run at (b)'s batch size: only compile differs
        t["eager_fp32"] = eager_throughput(images[:n_steps], device, ours_batch, False, precision)
        t["eager_bf16_cl"] = eager_throughput(images[:n_steps], device, ours_batch, True, precision)
        report["throughput"] = t
        report["ratio"] = lower_median(ratios)

        runs: dict[str, Any] = {}
        if not args.no_runs:
            overrides = [
                f"paths.root_dir={workdir}",
                f"data.data_dir={data_dir}",
                "model.weights=null",
                "trainer.max_epochs=10",
                "callbacks.early_stopping=null",  # always the full 10 epochs
            ]
            if quick:
                overrides += ["data.train_subset=6000", "data.val_size=1000", "data.test_subset=2000"]
            shutil.rmtree(workdir / "cache", ignore_errors=True)  # cold means cold
            runs["cold"] = run_train(workdir, "cold", overrides)
            runs["warm"] = run_train(workdir, "warm", overrides)
        report["runs"] = runs
        log("head epoch over 55k cached features ...")
        report["head_epoch"] = head_epoch_time(data_dir, workdir / "cache" / "features", precision)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    report["load_average_end"] = os.getloadavg()
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    report["bench_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    runs = report["runs"]
    report["targets"] = judge(report)
    table = markdown(report)
    report["table"] = table
    out = args.results_dir / f"{report['date']}{'-quick' if quick else ''}.json"
    atomic_write_json(out, report)
    print(table)
    print(f"\nresults: {out}")
    failed_runs = [name for name, run in runs.items() if run["returncode"] != 0]
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
