"""The pruning bench's training data (bench/pruning.py): random-init ResNet18 features of real
Fashion-MNIST images, and each configuration's val/acc curve, trained once and cached."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any


def features(size: int, n_train: int, n_val: int, seed: int, cache: Path) -> tuple[Any, Any, Any, Any]:
    """Random-init ResNet18 features of real Fashion-MNIST images (train, val), made once per setting."""
    import torch
    import torchvision
    from torch.nn import functional as F

    from fmnist_tl.core import atomic_path
    from fmnist_tl.data import IMAGENET_MEAN, IMAGENET_STD
    from fmnist_tl.data.raw_files import parse_idx, read_gz

    path = cache / f"features-{size}px-{n_train}-{n_val}-seed{seed}.pt"
    if path.is_file():
        return tuple(torch.load(path, weights_only=True))
    mirror = Path("/usr/share/datasets/fashion-mnist")
    images = parse_idx(read_gz(mirror / "train-images-idx3-ubyte.gz"), "train images", "images", None)
    labels = parse_idx(read_gz(mirror / "train-labels-idx1-ubyte.gz"), "train labels", "labels", None)
    # FashionMNISTDataModule's split: the first val_size of a seeded permutation are validation.
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    keep = torch.cat([perm[n_val : n_val + n_train], perm[:n_val]])
    images, labels = images[keep], labels[keep].long()
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    with torch.inference_mode():
        for batch in images.split(512):
            x = F.interpolate(batch.float().unsqueeze(1) / 255, size=(size, size), mode="bilinear")
            out.append(net((x.expand(-1, 3, -1, -1) - mean) / std))
    feats = torch.cat(out)
    feats = (feats - feats[:n_train].mean(0)) / (feats[:n_train].std(0) + 1e-6)
    data = (feats[:n_train], labels[:n_train], feats[n_train:], labels[n_train:])
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return data


class Curves:
    """Each configuration's val/acc per epoch, trained once and only as far as any search needed."""

    def __init__(self, data: tuple[Any, ...], cfg: Any, epochs: int, path: Path | None = None) -> None:
        self.data, self.cfg, self.epochs, self.path = data, cfg, epochs, path
        self.runs: dict[str, dict[str, Any]] = {}
        self.stored: dict[str, list[float]] = {}
        if path is not None and path.is_file():
            self.stored = json.loads(path.read_text())
        self.seconds = 0.0
        self.trained = 0

    def save(self) -> None:
        from fmnist_tl.core import atomic_write_text

        if self.path is not None:
            stored = {**self.stored, **{k: r["curve"] for k, r in self.runs.items()}}
            atomic_write_text(self.path, json.dumps(stored))

    def value(self, seed: int, params: dict[str, Any], epoch: int) -> float:
        key = json.dumps([seed, sorted(params.items())])
        if len(self.stored.get(key, ())) >= epoch:
            return self.stored[key][epoch - 1]
        run = self.runs.get(key) or self._start(key, seed, params)
        while len(run["curve"]) < epoch:
            self._epoch(run)
        if len(run["curve"]) == self.epochs:  # done: its curve is all that is needed from now on
            run.pop("head", None)
            run.pop("opt", None)
        return run["curve"][epoch - 1]

    def _start(self, key: str, seed: int, params: dict[str, Any]) -> dict[str, Any]:
        import hydra
        import torch
        import yaml

        from fmnist_tl.training import build_head

        digest = hashlib.sha256(repr((seed, tuple(sorted(params.items())))).encode()).digest()
        digest = int.from_bytes(digest[:4], "big")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(digest)
            head = build_head(self.data[0].shape[1], 10, yaml.safe_load(params["model.head.hidden_dims"]),
                              params["model.head.dropout"])  # fmt: skip
            rng = torch.get_rng_state()
        opt_cfg = {**self.cfg.model.optimizer, "lr": params["model.optimizer.lr"],
                   "weight_decay": params["model.optimizer.weight_decay"]}  # fmt: skip
        optimizer = hydra.utils.instantiate(opt_cfg)(head.parameters())
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        run = self.runs[key] = {"head": head, "opt": optimizer, "sched": schedule, "curve": [], "rng": rng,
                                "gen": torch.Generator().manual_seed(digest)}  # fmt: skip
        return run

    def _epoch(self, run: dict[str, Any]) -> None:
        import torch
        from torch import nn

        start = time.perf_counter()
        xt, yt, xv, yv = self.data
        batch, head, optimizer = int(self.cfg.data.batch_size), run["head"], run["opt"]
        # Dropout draws from the global RNG: each run keeps its own state, so its curve does not
        # depend on which other configurations trained in between.
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(run["rng"])
            head.train()
            order = torch.randperm(len(yt), generator=run["gen"])
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                loss = nn.functional.cross_entropy(head(xt[idx]), yt[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            run["rng"] = torch.get_rng_state()
        run["sched"].step()
        head.eval()
        with torch.inference_mode():
            run["curve"].append((head(xv).argmax(1) == yv).float().mean().item())
        self.seconds += time.perf_counter() - start
        self.trained += 1
