"""Training-step throughput of the head-only and fine-tune phases, on synthetic batches.

    python -m bench.finetune_speed --backbone resnet50 --image-size 224 --batch-size 32 --precision bf16

Prints img/s for: head (frozen backbone, what a head epoch costs), layer4 (the default fine-tune
phase), all (every stage trains). Each is a real optimizer step of TransferClassifier, so the
numbers include the backward through the unfrozen stages and the AdamW update.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from fmnist_tl.training import TransferClassifier


def steps_per_second(model: TransferClassifier, x: torch.Tensor, y: torch.Tensor, bf16: bool, steps: int) -> float:
    # What each phase's optimizer holds: the parameters that require grad (head, plus the unfrozen stages).
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up: allocator, oneDNN kernel selection
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    results = {}
    for name, finetune in (
        ("head", None),
        ("layer4", {"start_epoch": 0}),
        ("all", {"start_epoch": 0, "unfreeze": "all"}),
    ):
        # start_epoch 0: the fine-tune phase is on from the first step.
        model = TransferClassifier(backbone=args.backbone, weights=None, image_size=args.image_size, finetune=finetune)
        rate = steps_per_second(model, x, y, args.precision == "bf16", args.steps) * args.batch_size
        results[name] = round(rate, 1)
        print(f"{name:>6}: {rate:7.1f} img/s", flush=True)
    print(json.dumps({**vars(args), "img_per_s": results, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
