"""fmnist_tl speed benchmark: `python -m bench [--quick] [--weights-path FILE]` (or `make bench`).

In one command it measures, on this machine, in this run:

0. The machine: CPU model and flags (recorded, never used to decide anything), and its GEMM
   ceilings: 2048x2048 matmul rates in fp32, bf16, fp16 (torch) and int8 (torch._int_mm and ONNX
   Runtime's MatMulInteger), the best of each precision.
1. `python -m fmnist_tl.train` on the real data, 10 epochs, with a cold cache (everything: the
   extraction probe, ONNX export, int8 calibration and quantisation, the fidelity gate, compile and
   extraction of 70k images) and again warm: wall time and peak RSS. The cold run's extraction end
   to end (probe included) is amortised over its images.
2. The probe table (candidate, img/s, fidelity, chosen) of that choice, and the chosen extractor's
   steady throughput against (a) the typical tutorial pipeline (torchvision `FashionMNIST` with
   per-sample PIL `Resize(224)`, `Grayscale(3)`, `ToTensor`, `Normalize`, a `DataLoader`, float32),
   alternating over rounds; its share of the machine's ceiling (best GEMM rate among the
   precisions that passed the gate / 8.2 GFLOP per ResNet50 image).
3. One head-training epoch over 55k cached features.

The targets, and why the extraction's is a share of the machine's own ceiling: bench/targets.py.

Weights: a random-init ResNet50 (`model.weights=null`; this machine is offline), or a trained
backbone state_dict with `--weights-path` (the fidelity gate then judges real activations; speed
does not depend on the weights). It prints markdown tables and writes bench/results/<date>[-quick].json.
Figures from a shared, busy machine are pessimistic; the ratios (both sides measured back to back
in one process) are the robust part.
"""

from __future__ import annotations

import argparse
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

from bench.targets import IMAGES, TARGETS, cold_run_limit, end_to_end_of_ceiling, judge  # noqa: E402
from fmnist_tl.config import compose_config  # noqa: E402
from fmnist_tl.core import atomic_write_json, cpu_flags, cpu_model, module_sha256, sha256_file  # noqa: E402
from fmnist_tl.data import IMAGENET_MEAN, IMAGENET_STD, FashionMNISTDataModule  # noqa: E402
from fmnist_tl.features import (  # noqa: E402
    Planner,
    extraction_settings,
    features_cache_dir,
    onnxruntime_version,
)
from fmnist_tl.runtime import build  # noqa: E402
from fmnist_tl.training import resolve_precision  # noqa: E402

WEIGHTS_NOTE = "random-init ResNet50 (model.weights=null; offline); throughput does not depend on weight values"
RESNET50_GFLOP = 8.2  # per 224-px image: 4.1 GMAC
GEMM_N = 2048


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_info(device: torch.device, weights_note: str) -> dict[str, Any]:
    flags = cpu_flags()
    info = {
        "cpu": cpu_model(),
        # For the record only: every speed choice is measured.
        "cpu_flags_of_note": [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c")) or "vnni" in f],
        "cpu_flags": flags,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnxruntime": onnxruntime_version(),
        "python": platform.python_version(),
        "device": str(device),
        "load_average_start": os.getloadavg(),
        "weights": weights_note,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------
# 0. GEMM ceilings


def _rate(step: Any, ops: float, warmup: Any = None, min_seconds: float = 1.0) -> float:
    """G(FL)OP/s of `step`: timed repetitions until `min_seconds` have passed (at least one).

    Warm-up on a small problem of the same kind when given: an emulated precision (bf16 or fp16 on
    a CPU without them) can take tens of seconds per full-size GEMM.
    """
    (warmup or step)()
    reps, t0 = 0, time.perf_counter()
    while reps < 1 or time.perf_counter() - t0 < min_seconds:
        step()
        reps += 1
    return round(ops * reps / (time.perf_counter() - t0) / 1e9, 1)


def _ort_gemm(kind: str, n: int) -> float | None:
    """ONNX Runtime's own n^3 GEMM: MatMul (fp32) or MatMulInteger (u8 x s8 -> int32, as its int8 convs)."""
    try:
        import numpy as np
        import onnx
        from onnx import TensorProto, helper

        from fmnist_tl.features import session
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    if kind == "32":
        a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
        op, types = "MatMul", (TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT)
    else:
        a, b = rng.integers(0, 256, (n, n), dtype=np.uint8), rng.integers(-128, 128, (n, n), dtype=np.int8)
        op, types = "MatMulInteger", (TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])],
        "gemm",
        [helper.make_tensor_value_info("a", types[0], [n, n]), helper.make_tensor_value_info("b", types[1], [n, n])],
        [helper.make_tensor_value_info("c", types[2], [n, n])],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gemm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
        sess = session(path)
        return _rate(lambda: sess.run(["c"], {"a": a, "b": b}), 2 * n**3)


def _sized_rate(mm: Any, a: torch.Tensor, b: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(rate, size): at full size, or at 512 when a full-size GEMM would take over a second.

    An emulated precision (bf16/fp16 on a CPU without them, int8 without VNNI in torch) can run at
    ~0.1-1 GFLOP/s, minutes per 2048^3 GEMM; at 512 it is measured in a second, which is plenty to
    show it is no ceiling.
    """
    n = a.shape[0]
    sa, sb = a[:512, :512].contiguous(), b[:512, :512].contiguous()
    rate = _rate(lambda: (mm(sa, sb), sync(device)), 2 * 512**3, min_seconds=0.5)
    if rate < 2 * n**3 / 1e9:
        return rate, 512
    return _rate(lambda: (mm(a, b), sync(device)), 2 * n**3), n


def gemm_ceilings(device: torch.device, n: int = GEMM_N) -> dict[str, Any]:
    """GFLOP/s (GOPS for int8) of an n x n x n matmul per precision and runtime, and the best per precision."""
    rates: dict[str, float | None] = {}
    g = torch.Generator().manual_seed(0)
    operands = {
        name: (torch.mm, *(torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2)))
        for name, dtype in (("32", torch.float32), ("bf16", torch.bfloat16), ("16", torch.float16))
    }
    operands["int8"] = (
        torch._int_mm,
        *(torch.randint(-128, 128, (n, n), dtype=torch.int8, generator=g).to(device) for _ in range(2)),
    )
    for name, (mm, a, b) in operands.items():
        try:
            rate, size = _sized_rate(mm, a, b, device)
        except RuntimeError as e:
            log(f"    torch {name} matmul failed: {e}")
            rates[f"torch:{name}"] = None
            continue
        rates[f"torch:{name}" if size == n else f"torch:{name}@{size}"] = rate
    if device.type == "cpu":
        rates["onnxruntime:32"] = _ort_gemm("32", n)
        rates["onnxruntime:int8"] = _ort_gemm("int8", n)
    best = {}
    for precision in ("32", "bf16", "16", "int8"):
        found = [v for k, v in rates.items() if k.split("@")[0].endswith(f":{precision}") and v]
        best[precision] = max(found) if found else None
    return {"n": n, "rates": rates, "best": best}


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


def bench_plan(overrides: list[str], device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The extraction plan `python -m fmnist_tl.train` with these overrides makes, from its cache.

    After the cold run every record (probe timings, gate figures, ONNX models) is on disk, so this
    rebuilds the same model (same seed, same weights) and reads them; with --no-runs it probes here.
    """
    cfg = compose_config("train", overrides)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build(cfg.model, _recursive_=False)
    dm = build(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    settings = extraction_settings(cfg.features)
    planner = Planner(
        root=features_cache_dir(cfg),
        settings=settings,
        device=device,
        backbone=model.backbone,
        backbone_name=cfg.model.backbone,
        preprocess=model.preprocess,
        weights_sha256=module_sha256(model.backbone),
        train_images=dm.image_splits["train"][0],
    )
    start = time.perf_counter()
    plan = planner.choose(settings.backend, settings.precision, job_images=len(dm.data_train) + len(dm.data_val))
    seconds = round(time.perf_counter() - start, 1)
    table = []
    for cid, timing in sorted(plan.timings.items(), key=lambda kv: -kv[1]["img_per_s"]):
        gate = plan.gates.get(cid)
        table.append(
            {
                "candidate": cid,
                "img_per_s": timing["img_per_s"],
                "gate": gate,
                "chosen": cid == plan.candidate.id,
            }
        )
    return plan, {"seconds": seconds, "table": table, "summary": plan.summary(), "planner": planner}


def passed_precisions(plan_summary: dict[str, Any]) -> list[str]:
    """fp32, plus every reduced precision with a candidate that was gated and passed."""
    passed = {"32"}
    for cid, gate in (plan_summary.get("gate") or {}).items():
        if gate.get("passed"):
            passed.add("int8" if "int8" in cid else cid.split(":")[1].split("+")[0])
    return sorted(passed)


def ours_throughput(extractor: Any, images: torch.Tensor) -> dict[str, Any]:
    """Steady rate of the chosen extractor (its one-off warm-up, e.g. a compile, happened before)."""
    progress, extractor.progress = extractor.progress, False
    try:
        clock = Clock()
        extractor(images)
        result = clock.result(len(images))
    finally:
        extractor.progress = progress
    return {
        **result,
        "backend": getattr(extractor, "backend", "torch"),
        "compiled": getattr(extractor, "compiled_used", False),
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


def head_epoch_time(data_dir: Path, cache_dir: Path, device: torch.device, epochs: int = 3) -> dict[str, Any]:
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
    # As train() resolves it with cached features: 32-true on a CPU, bf16-mixed on a CUDA GPU with bf16.
    precision = resolve_precision({"precision": "auto", "accelerator": "gpu" if device.type == "cuda" else "cpu"})
    dm = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=batch_size, eval_batch_size=256)
    dm.data_train = TensorDataset(feats, labels)
    dm.data_val = TensorDataset(feats[:256], labels[:256])
    model = build(cfg.model, _recursive_=False)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    threads = torch.get_num_threads()
    head_threads = extraction_settings(cfg.features).head_threads  # as FeatureCache sets it
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
                "extraction": m.get("extraction"),
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


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.1f}{unit}"


def markdown(r: dict[str, Any]) -> str:
    m, t = r["machine"], r["throughput"]
    a, b = t["tutorial"]["img_per_s"], t["ours"]
    lines = [
        f"fmnist_tl benchmark, {r['date']}, mode {r['mode']}: {m['cpu']} ({', '.join(m['cpu_flags_of_note'])}), "
        f"{m['cores']} cores, torch {m['torch']}, onnxruntime {m.get('onnxruntime')}, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + f", load average at start {'/'.join(f'{x:.1f}' for x in m['load_average_start'])} (end "
        f"{'/'.join(f'{x:.1f}' for x in r['load_average_end'])}).",
        f"Weights: {m['weights']}.",
    ]
    g = r.get("gemm")
    if g:
        lines += [
            "",
            f"| GEMM {g['n']}x{g['n']}x{g['n']} (GFLOP/s; int8 GOPS) | torch | onnxruntime | best "
            "| ResNet50 img/s at that rate |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for p in ("32", "bf16", "16", "int8"):
            best = g["best"].get(p)
            small = g["rates"].get(f"torch:{p}@512")
            torch_rate = _fmt(g["rates"].get(f"torch:{p}")) if small is None else f"{small:,.1f} (at 512)"
            lines.append(
                f"| {p} | {torch_rate} | {_fmt(g['rates'].get(f'onnxruntime:{p}'))} "
                f"| {_fmt(best)} | {_fmt(best / RESNET50_GFLOP if best else None)} |"
            )
    pr = r.get("probe")
    if pr:
        lines += [
            "",
            "| probe candidate (this machine, batch "
            f"{b['batch_size']}) | img/s | fidelity: cosine to fp32, mean / worst | chosen |",
            "| --- | ---: | --- | --- |",
        ]
        for row in pr["table"]:
            gate = row["gate"]
            if gate is None:
                fid = "fp32 reference" if row["candidate"].split(":")[1].startswith("32") else "not gated (slower)"
            else:
                fid = f"{gate['mean_cosine']:.5f} / {gate['worst_cosine']:.5f}: {'pass' if gate['passed'] else 'FAIL'}"
            lines.append(
                f"| {row['candidate']} | {row['img_per_s']:.1f} | {fid} | {'**yes**' if row['chosen'] else ''} |"
            )
    lines += [
        "",
        "| ResNet50 at 224 px, same images | img/s | vs tutorial | cores busy |",
        "| --- | ---: | ---: | ---: |",
        f"| (a) tutorial: per-sample PIL Resize/Grayscale/ToTensor/Normalize, DataLoader, float32, "
        f"batch {t['tutorial']['batch_size']} | {a:.1f} | 1.0x | {t['tutorial']['cores_busy']:.2f} |",
        f"| (b) fmnist_tl extraction as chosen ({b['backend']} {b['precision']}"
        + (", compiled" if b.get("compiled") else "")
        + f", batch {b['batch_size']}), steady | {b['img_per_s']:.1f} | {r['ratio']:.1f}x | {b['cores_busy']:.2f} |",
    ]
    e2e = r.get("end_to_end")
    if e2e:
        lines.append(
            f"| (b) end to end in the cold run: {e2e['images']} images in {e2e['seconds']:.0f} s (choice: probe, "
            f"export, calibration, quantisation, gate {e2e['plan_seconds']:.0f} s) | {e2e['img_per_s']:.1f} "
            f"| **{e2e['ratio']:.1f}x** | |"
        )
    if e2e and e2e.get("projected_70k"):
        proj = e2e["projected_70k"]
        lines.append(
            f"| (b) end to end projected to 70000 images (the same choice cost, the cold run's extraction rate) "
            f"| {proj['img_per_s']:.1f} | {proj['ratio']:.1f}x | |"
        )
    lines += [
        "",
        f"Steady throughput on {t['tutorial']['images']} images, the median of {len(t['rounds']['ratios'])} "
        "alternating rounds (ratios per round: " + ", ".join(f"{x:.1f}x" for x in t["rounds"]["ratios"]) + "). "
        f"'cores busy' is the CPU time this process got per second of wall time, out of {m['cores']} cores: "
        "below that, other work on the machine took the rest.",
        "",
        "| measure | value | target | |",
        "| --- | ---: | ---: | --- |",
    ]
    c = r.get("ceiling")
    if c and c.get("fraction") is not None:
        share = end_to_end_of_ceiling(r)
        ceiling = (
            f"ceiling ({c['precision']} GEMM {c['gemm_rate']:.0f} / {RESNET50_GFLOP} GFLOP = "
            f"{c['img_per_s']:.1f} img/s; precisions that passed the gate: {', '.join(c['passed'])})"
        )
        if share is not None:
            lines.append(
                f"| extraction end to end / {ceiling} | {100 * share:.0f}% "
                f"| >= {100 * TARGETS['end_to_end_of_ceiling']:.0f}% "
                f"| {verdict(r['targets']['end_to_end_of_ceiling'])} |"
            )
        lines.append(f"| extraction steady / ceiling | {100 * c['fraction']:.0f}% | | |")
    if e2e:
        lines.append(f"| extraction end to end / tutorial | {e2e['ratio']:.1f}x | | |")
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
            rate = f" (extraction {total} images in {secs:.0f} s = {total / secs:.0f} img/s)" if secs else ""
        target_key = f"{name}_run_s"
        limit = cold_run_limit(r) if name == "cold" else TARGETS[target_key]
        target = "" if limit is None else f"< {limit:.0f} s"
        failed = f" **FAILED (exit {run['returncode']})**" if run["returncode"] != 0 else ""
        lines.append(
            f"| `python -m fmnist_tl.train`, {scope}, 10 epochs + test, {name} cache{rate}{failed}, "
            f"{run['cores_busy']:.2f} cores busy "
            f"| {run['wall_s']:.0f} s | {target} | {verdict(r['targets'].get(target_key))} |"
        )
        lines.append(
            f"| peak RSS, {name} run | {run['peak_rss_gb']:.2f} GB | < {TARGETS['peak_rss_gb']:.0f} GB "
            f"| {verdict(r['targets'].get(f'{name}_rss'))} |"
        )
    if runs.get("cold") and runs.get("warm"):
        lines.append(f"| cold / warm wall time | {runs['cold']['wall_s'] / runs['warm']['wall_s']:.1f}x | | |")
        lines.append(
            f"| val / test accuracy (warm run) | {runs['warm'].get('val_acc') or 0:.3f} / "
            f"{runs['warm'].get('test_acc') or 0:.3f} | | |"
        )
    if r["mode"] == "quick":
        lines += [
            "",
            "Quick mode: the end-to-end share of the ceiling and the run wall-time targets are for the full data "
            "and not judged.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and a 6k/2k-image training subset")
    parser.add_argument("--images", type=int, help="images for the throughput comparison (default 512, quick 192)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating (a)/(b) rounds; the median is reported")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--weights-path", type=Path, help="a trained ResNet50 backbone state_dict (default: random)")
    parser.add_argument("--workdir", type=Path, help="data, cache and run logs (default: a temp dir, removed)")
    parser.add_argument("--no-runs", action="store_true", help="skip the cold/warm python -m fmnist_tl.train runs")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--backbones", help="only the per-backbone table (bench/backbones.py): comma-separated model.backbone names"
    )
    args = parser.parse_args(argv)
    if args.backbones:
        from bench.backbones import run as run_backbones

        names = [n for n in args.backbones.split(",") if n]
        run_backbones(names, args.images or 64, args.results_dir, argv if argv is not None else sys.argv[1:])
        return 0

    quick = args.quick
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    batch = 64
    n = args.images or (192 if quick else 512)
    n = max(batch, n - n % batch)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmnist_bench_"))
    own_workdir = args.workdir is None
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    if args.weights_path:
        weights = [f"model.weights_path={args.weights_path.resolve()}"]
        note = f"trained backbone {args.weights_path.name} (sha256 {sha256_file(args.weights_path)[:16]})"
    else:
        weights, note = ["model.weights=null"], WEIGHTS_NOTE
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "mode": "quick" if quick else "full",
        "machine": machine_info(device, note),
        "command": "python -m bench" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
    }
    started = time.perf_counter()
    if os.getloadavg()[0] > report["machine"]["cores"]:
        log(f"load average {os.getloadavg()[0]:.1f} > {report['machine']['cores']} cores: figures will be pessimistic")
    overrides = [
        f"paths.root_dir={workdir}",
        f"data.data_dir={data_dir}",
        *weights,
        "trainer.max_epochs=10",
        "callbacks.early_stopping=null",  # always the full 10 epochs
    ]
    if quick:
        overrides += ["data.train_subset=6000", "data.val_size=1000", "data.test_subset=2000"]
    try:
        dm = FashionMNISTDataModule(data_dir=str(data_dir))
        dm.prepare_data()
        log("GEMM ceilings ...")
        report["gemm"] = gemm_ceilings(device)
        log(f"    best per precision: {report['gemm']['best']}")

        runs: dict[str, Any] = {}
        if not args.no_runs:
            shutil.rmtree(workdir / "cache", ignore_errors=True)  # cold means cold: no probe, model or feature cache
            runs["cold"] = run_train(workdir, "cold", overrides)
            runs["warm"] = run_train(workdir, "warm", overrides)
        report["runs"] = runs

        log("the extraction choice (read from the cold run's records; probed here with --no-runs) ...")
        plan, probe = bench_plan(overrides, device)
        probe.pop("planner").close()
        report["probe"] = probe
        extractor = plan.extractor
        images = torchvision.datasets.FashionMNIST(str(data_dir), train=True, download=False).data[:n].unsqueeze(1)
        warm_start = time.perf_counter()
        ours_throughput(extractor, images[: extractor.batch_size])  # session load / compile, not timed
        log(f"    {plan.candidate.id}; warm-up {time.perf_counter() - warm_start:.1f} s")
        # (a) and (b) alternate, so a burst of load elsewhere hits one round of each, not one side.
        tutorial, ours, ratios = [], [], []
        for r in range(args.rounds):
            log(f"round {r + 1}/{args.rounds}: (a) tutorial pipeline, then (b) fmnist_tl extraction, {n} images each")
            tutorial.append(tutorial_throughput(data_dir, n, device, batch))
            ours.append(ours_throughput(extractor, images))
            ratios.append(round(ours[-1]["img_per_s"] / tutorial[-1]["img_per_s"], 2))
            log(f"    (a) {tutorial[-1]['img_per_s']} img/s, (b) {ours[-1]['img_per_s']} img/s: {ratios[-1]}x")
        report["throughput"] = {
            "tutorial": median_round(tutorial),
            "ours": median_round(ours),
            "rounds": {"tutorial": tutorial, "ours": ours, "ratios": ratios},
        }
        report["ratio"] = lower_median(ratios)
        tutorial_rate = report["throughput"]["tutorial"]["img_per_s"]

        cold = runs.get("cold")
        if cold and isinstance(cold.get("feature_cache"), dict) and cold.get("extraction"):
            count = sum(v["count"] for v in cold["feature_cache"].values())
            plan_s = cold["extraction"].get("seconds") or 0.0
            seconds = plan_s + sum(v["seconds"] or 0 for v in cold["feature_cache"].values())
            report["end_to_end"] = {
                "images": count,
                "seconds": round(seconds, 1),
                "plan_seconds": plan_s,
                "img_per_s": round(count / seconds, 2),
                "ratio": round(count / seconds / tutorial_rate, 2),
            }
            if count < IMAGES:  # --quick: the choice's one-off cost amortised over the full 70k instead
                full = plan_s + (seconds - plan_s) * IMAGES / count
                report["end_to_end"]["projected_70k"] = {
                    "seconds": round(full, 1),
                    "img_per_s": round(IMAGES / full, 2),
                    "ratio": round(IMAGES / full / tutorial_rate, 2),
                }
        passed = passed_precisions(probe["summary"])
        rates = {p: report["gemm"]["best"].get(p) for p in passed if report["gemm"]["best"].get(p)}
        if rates:
            best = max(rates, key=rates.get)
            ceiling = rates[best] / RESNET50_GFLOP
            report["ceiling"] = {
                "passed": passed,
                "precision": best,
                "gemm_rate": rates[best],
                "img_per_s": round(ceiling, 2),
                "fraction": round(report["throughput"]["ours"]["img_per_s"] / ceiling, 3),
            }
            report["ceiling"]["end_to_end_fraction"] = end_to_end_of_ceiling(report)

        log("head epoch over 55k cached features ...")
        report["head_epoch"] = head_epoch_time(data_dir, workdir / "cache" / "features", device)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    report["load_average_end"] = os.getloadavg()
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    report["bench_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    runs = report["runs"]
    report["targets"] = judge(report)
    report["cold_run_target_s"] = cold_run_limit(report)  # this machine's: from its ceiling (bench/targets.py)
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
