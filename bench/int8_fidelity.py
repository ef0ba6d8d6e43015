"""int8 fidelity on a trained network: `python -m bench.int8_fidelity --weights FILE [--full FILE]`.

Random-init activations say little about quantisation error, so this takes a ResNet50 backbone
state_dict trained by the project (docs/feature-cache.md, "Why those gate thresholds") and, at 224 px on real
Fashion-MNIST images, measures for every int8 variant of fmnist_tl's ONNX Runtime path:

1. cosine similarity of int8 features to fp32 features (mean, worst, 1st percentile), on the
   fidelity gate's own sample (held-out training images) and on test images;
2. the test accuracy of the project's head (Linear-ReLU-Dropout-Linear, AdamW, as in training)
   trained on int8 features against the same head, same seed, trained on fp32 features;
3. with `--full` (a whole TransferClassifier state_dict), the trained model's own head on int8
   vs fp32 features.

The int8 models are built exactly as training builds them (fmnist_tl.features.probe.Planner: calibration on
seeded training-split images, QDQ per-channel static quantisation) and are cached under --workdir.
fp32 features come from ONNX Runtime's fp32 model (checked against torch on the gate sample).
Results: printed as markdown and written to bench/results/int8-fidelity-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fmnist_tl.backbones import load_state_dict_file  # noqa: E402
from fmnist_tl.config import FeaturesConfig  # noqa: E402
from fmnist_tl.core import atomic_write_json, cpu_model, module_sha256, sha256_file  # noqa: E402
from fmnist_tl.data import FashionMNISTDataModule  # noqa: E402
from fmnist_tl.features import (  # noqa: E402
    INT8_VARIANTS,
    Candidate,
    Planner,
    cosine_figures,
)
from fmnist_tl.training import TransferClassifier, build_head  # noqa: E402


def log(msg: str) -> None:
    print(f"[int8-fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cosine_detail(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    cos = nn.functional.cosine_similarity(ref.double(), got.double(), dim=1)
    return {**cosine_figures(ref, got), "p01_cosine": round(float(torch.quantile(cos, 0.01)), 6)}


def train_head(feats: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, hidden: int = 256) -> nn.Module:
    """The project's default head and optimiser (conf/model/resnet50.yaml), trained on fixed features."""
    torch.manual_seed(seed)
    head = build_head(feats.shape[1], 10, [hidden], 0.5)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(feats), generator=g).split(64):
            loss = nn.functional.cross_entropy(head(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


@torch.no_grad()
def accuracy(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return float((head(feats).argmax(1) == labels).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True, help="ResNet50 backbone state_dict (torchvision keys)")
    parser.add_argument("--full", type=Path, help="whole TransferClassifier state_dict: also test its own head")
    parser.add_argument("--train-images", type=int, default=3000, help="training images the heads learn from")
    parser.add_argument("--test-images", type=int, default=2000, help="test images the heads are scored on")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3, help="head seeds (the accuracy gap is reported per seed)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fmnist_int8_fidelity"))
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    model = TransferClassifier(backbone="resnet50", weights=None, weights_path=str(args.weights), image_size=224)
    if args.full:
        model.load_state_dict(load_state_dict_file(args.full, "--full"), strict=True)
    model.eval()
    dm = FashionMNISTDataModule(data_dir=str(args.workdir / "data"))
    dm.prepare_data()
    dm.setup("fit")
    train_x, train_y = dm.data_train.tensors
    test_x, test_y = dm.data_test.tensors
    settings = FeaturesConfig(progress=False)
    planner = Planner(
        root=args.workdir / "cache",
        settings=settings,
        device=torch.device("cpu"),
        backbone=model.backbone,
        backbone_name="resnet50",
        preprocess=model.preprocess,
        weights_sha256=module_sha256(model.backbone),
        train_images=train_x,
    )
    # Head-training images: seeded, and disjoint from the calibration and gate images.
    used = {bytes(x.numpy()) for x in torch.cat([planner.runners.cal_images, planner.gate_images])}
    pool = [i for i in torch.randperm(len(train_x), generator=torch.Generator().manual_seed(7)).tolist()]
    head_idx = torch.tensor([i for i in pool if bytes(train_x[i].numpy()) not in used][: args.train_images])
    sets = {
        "gate": (planner.gate_images, None),
        "train": (train_x[head_idx], train_y[head_idx]),
        "test": (test_x[: args.test_images], test_y[: args.test_images]),
    }

    def extract(c: Candidate) -> dict[str, torch.Tensor]:
        out = {}
        for name, (images, _) in sets.items():
            t0 = time.perf_counter()
            out[name] = planner.runners.features(c, images)
            log(f"{c.id} {name}: {len(images)} images in {time.perf_counter() - t0:.0f} s")
        return out

    fp32 = extract(Candidate("onnxruntime", "32"))
    torch_gate = planner.runners.features(Candidate("torch", "32"), planner.gate_images)
    result: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "command": "python -m bench.int8_fidelity " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(),
        "weights": {"file": str(args.weights), "sha256": sha256_file(args.weights)},
        "images": {k: len(v[0]) for k, v in sets.items()},
        "calibration": planner.runners.calibration,
        "thresholds": {"mean": settings.gate_mean_cosine, "worst": settings.gate_worst_cosine},
        "onnxruntime_fp32_vs_torch_fp32_gate": cosine_detail(torch_gate, fp32["gate"]),
        "variants": {},
    }
    fp32_heads = [train_head(fp32["train"], sets["train"][1], args.epochs, s) for s in range(args.seeds)]
    fp32_acc = [accuracy(h, fp32["test"], sets["test"][1]) for h in fp32_heads]
    result["fp32_head_test_acc"] = fp32_acc
    if args.full:
        result["trained_head_fp32_test_acc"] = accuracy(model.head, fp32["test"], sets["test"][1])
    for variant in INT8_VARIANTS:
        c = Candidate("onnxruntime", "int8", variant)
        q = extract(c)
        heads = [train_head(q["train"], sets["train"][1], args.epochs, s) for s in range(args.seeds)]
        acc = [accuracy(h, q["test"], sets["test"][1]) for h in heads]
        row = {
            "quantization": planner.runners.quantization(c),
            "gate_sample": cosine_detail(fp32["gate"], q["gate"]),
            "test_images": cosine_detail(fp32["test"], q["test"]),
            "int8_head_test_acc": acc,
            "acc_gap_points": [round(100 * (a - b), 2) for a, b in zip(fp32_acc, acc, strict=True)],
        }
        g = row["gate_sample"]
        row["passes_gate"] = (
            g["mean_cosine"] >= settings.gate_mean_cosine and g["worst_cosine"] >= settings.gate_worst_cosine
        )
        if args.full:
            row["trained_head_int8_test_acc"] = accuracy(model.head, q["test"], sets["test"][1])
        result["variants"][variant] = row
        log(f"{variant}: {json.dumps(row)}")
    planner.close()
    # Where do the gate's thresholds lie? Perturb the fp32 features with seeded noise of growing size
    # and watch cosine and accuracy together: the thresholds must sit well before accuracy moves.
    sweep = []
    g = torch.Generator().manual_seed(11)
    for rel in (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0):
        noisy = {k: fp32[k] + rel * fp32[k].std() * torch.randn(fp32[k].shape, generator=g) for k in ("train", "test")}
        noisy = {k: v.clamp_min(0) for k, v in noisy.items()}  # pooled ReLU features are >= 0
        head = train_head(noisy["train"], sets["train"][1], args.epochs, 0)
        row = {"noise_rel_std": rel, **cosine_detail(fp32["test"], noisy["test"])}
        row["retrained_head_acc_gap_points"] = round(
            100 * (fp32_acc[0] - accuracy(head, noisy["test"], sets["test"][1])), 2
        )
        if args.full:
            row["trained_head_acc_gap_points"] = round(
                100 * (result["trained_head_fp32_test_acc"] - accuracy(model.head, noisy["test"], sets["test"][1])), 2
            )
        sweep.append(row)
        log(f"noise {rel}: {json.dumps(row)}")
    result["noise_sweep"] = sweep
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = args.results_dir / f"int8-fidelity-{result['date']}.json"
    atomic_write_json(out, result)
    print(markdown(result))
    print(f"\nresults: {out}")
    return 0


def markdown(r: dict[str, Any]) -> str:
    fp32_acc = r["fp32_head_test_acc"]
    lines = [
        f"int8 fidelity, {r['date']}, {r['cpu']}: weights sha256 {r['weights']['sha256'][:12]}, "
        f"{r['images']['train']} head-training / {r['images']['test']} test images at 224 px, "
        f"{len(fp32_acc)} head seeds.",
        "",
        "| variant | gate sample cos mean / worst | test cos mean / worst / 1st pct | head acc fp32 -> int8 "
        "(points, per seed) | trained head fp32 -> int8 | passes gate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in r["variants"].items():
        g, t = v["gate_sample"], v["test_images"]
        heads = ", ".join(
            f"{100 * a:.2f} -> {100 * b:.2f}" for a, b in zip(fp32_acc, v["int8_head_test_acc"], strict=True)
        )
        trained = (
            f"{100 * r['trained_head_fp32_test_acc']:.2f} -> {100 * v['trained_head_int8_test_acc']:.2f}"
            if "trained_head_int8_test_acc" in v
            else "-"
        )
        lines.append(
            f"| {name} | {g['mean_cosine']:.5f} / {g['worst_cosine']:.5f} | {t['mean_cosine']:.5f} / "
            f"{t['worst_cosine']:.5f} / {t['p01_cosine']:.5f} | {heads} | {trained} | {v['passes_gate']} |"
        )
    lines += [
        "",
        "| fp32 features + noise (std x fp32 std) | test cos mean / worst | retrained head gap (points) "
        "| trained head gap (points) |",
        "| ---: | --- | ---: | ---: |",
    ]
    for row in r.get("noise_sweep", []):
        lines.append(
            f"| {row['noise_rel_std']} | {row['mean_cosine']:.5f} / {row['worst_cosine']:.5f} "
            f"| {row['retrained_head_acc_gap_points']:+.2f} "
            f"| {row.get('trained_head_acc_gap_points', float('nan')):+.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
