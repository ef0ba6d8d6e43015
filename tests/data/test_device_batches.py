"""Cached features served as whole-tensor batches (DeviceBatches) on any device, not through a DataLoader."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fmnist_tl.data.fashion_mnist import DeviceBatches, EpochShuffleSampler, FashionMNISTDataModule
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


def test_on_a_cpu_the_batches_are_the_dataloaders_with_the_epoch_sampler():
    feats = torch.randn(150, 4).half()
    loader = DataLoader(TensorDataset(feats, torch.arange(150)), batch_size=64, sampler=EpochShuffleSampler(150, 42))
    for epoch in (0, 3):
        loader.sampler.set_epoch(epoch)
        ours = list(DeviceBatches(feats, torch.arange(150), 64, True, seed=42, epoch=lambda e=epoch: e))
        theirs = list(loader)
        assert len(ours) == len(theirs) == 3
        for (x, y), (x2, y2) in zip(ours, theirs, strict=True):
            assert torch.equal(y, y2) and torch.equal(x, x2) and x.dtype == x2.dtype


def _dataloader_as_before(self, dataset, shuffle, batch_size, device):
    """The CPU path before whole-tensor batching: a DataLoader with the epoch-seeded sampler."""
    sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler)


@pytest.mark.slow
def test_cpu_runs_serve_cached_features_whole_tensor_and_train_exactly_as_with_the_dataloader(
    tiny_cfg, tmp_path, monkeypatch
):
    served = []
    original = FashionMNISTDataModule._loader

    def record(self, *args):
        served.append(original(self, *args))
        return served[-1]

    monkeypatch.setattr(FashionMNISTDataModule, "_loader", record)
    run = ("trainer.max_epochs=2", "model.head.dropout=0.3")
    ours = train(tiny_cfg(*run, output="ours"))
    assert ours["feature_cache"]["train"]["status"] == "extracted"
    assert served and all(isinstance(s, DeviceBatches) for s in served)  # train, val and test
    monkeypatch.setattr(FashionMNISTDataModule, "device_batches", _dataloader_as_before)
    before = train(tiny_cfg(*run, output="before"))
    for key in ("val/acc", "val/f1", "val/loss", "test/acc", "test/loss", "global_step"):
        assert ours[key] == before[key], key
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("ours", "before"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a["optimizer_states"][0]["state"][0]["exp_avg"], b["optimizer_states"][0]["state"][0]["exp_avg"])
