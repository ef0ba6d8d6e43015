"""Cached features served from the device on CUDA (DeviceBatches); on a CPU the DataLoader path is unchanged."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from fmnist_tl.data import DeviceBatches, EpochShuffleSampler
from fmnist_tl.runtime import build
from fmnist_tl.train import train


def make(n: int = 150, shuffle: bool = True, epoch: int = 0) -> DeviceBatches:
    feats = torch.arange(n, dtype=torch.float32).unsqueeze(1).expand(n, 4).contiguous()
    return DeviceBatches(feats, torch.arange(n), 64, shuffle, seed=42, epoch=lambda: epoch)


def test_device_batches_cover_the_split_once_in_a_seeded_per_epoch_order():
    batches = list(make())
    assert [len(y) for _, y in batches] == [64, 64, 22] and len(make()) == 3
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(150)) and order.tolist() != list(range(150))
    assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)  # rows stay paired with their labels
    assert torch.equal(torch.cat([y for _, y in make()]), order)  # same (seed, epoch): same order
    assert not torch.equal(torch.cat([y for _, y in make(epoch=1)]), order)
    unshuffled = torch.cat([y for _, y in make(shuffle=False)])
    assert unshuffled.tolist() == list(range(150))


def test_cpu_runs_keep_the_dataloader_and_sampler(tiny_cfg):
    cfg = tiny_cfg("trainer.max_epochs=1", "test=false")
    metrics = train(cfg)
    assert metrics["status"] == "completed" and metrics["feature_cache"]["train"]["status"] == "extracted"
    dm = build(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    dm.use_cached_features("train", torch.zeros(len(dm.data_train), 8))
    loader = dm.train_dataloader()  # no trainer (CPU): the DataLoader with the epoch-seeded sampler, as before
    assert isinstance(loader, DataLoader) and isinstance(loader.sampler, EpochShuffleSampler)
