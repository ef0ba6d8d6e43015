"""What a sweep's trials share in one process, so a trial costs little more than its head epochs.

Hydra's basic launcher runs a sweep's trials one after another in one process: the second trial
copies the backbone the first built (no init or weights load, no hashing), and finds the feature
cache files it already checked. Nothing is shared that could differ: keys hold what determines the
weights and the files' stat.
"""

from __future__ import annotations

import os

import pytest
import torch

import fmnist_tl.backbones.weights as weights_module
import fmnist_tl.data.raw_files as raw_files
import fmnist_tl.features.manifest as manifest_store
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.core.files import module_sha256
from fmnist_tl.features.store import FeatureStore
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import TINY_SIZES, write_tiny_mirror


def test_a_backbone_built_before_is_copied_not_rebuilt(monkeypatch):
    first = TransferClassifier(backbone="resnet18", weights=None, image_size=32, init_seed=11)
    first_sha = first.weights_sha256
    inits, hashes = [], []
    monkeypatch.setattr(weights_module, "_build_backbone", lambda *a: inits.append(a))  # would fail if called
    monkeypatch.setattr(weights_module, "module_sha256", lambda m: hashes.append(m))
    second = TransferClassifier(backbone="resnet18", weights=None, image_size=32, init_seed=11)
    assert inits == [] and second.weights_sha256 == first_sha and hashes == []
    for (name, a), b in zip(first.backbone.state_dict().items(), second.backbone.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name  # equal, but a copy of its own
    assert not any(p.requires_grad for p in second.backbone.parameters())
    monkeypatch.undo()
    # Another seed, or no seed at all, is built anew.
    other = TransferClassifier(backbone="resnet18", weights=None, image_size=32, init_seed=12)
    assert other.weights_sha256 != first_sha == module_sha256(first.backbone)
    unseeded = [TransferClassifier(backbone="resnet18", weights=None, image_size=32) for _ in range(2)]
    assert module_sha256(unseeded[0].backbone) != module_sha256(unseeded[1].backbone)


def test_a_backbone_that_trains_is_hashed_each_time():
    model = TransferClassifier(
        backbone="resnet18", weights=None, image_size=32, init_seed=11, finetune={"start_epoch": 0}
    )
    before = model.weights_sha256
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    assert (
        model.weights_sha256
        != before
        == module_sha256(TransferClassifier(backbone="resnet18", weights=None, image_size=32, init_seed=11).backbone)
    )


def test_a_cache_file_checked_once_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    fp = {"split": "train"}
    tensors = {"features": torch.randn(8, 4).half(), "labels": torch.arange(8)}
    store.save("entry", tensors, {"fingerprint": fp})
    hashed = []
    real = manifest_store.sha256_file
    monkeypatch.setattr(manifest_store, "sha256_file", lambda p: hashed.append(p) or real(p))
    for _ in range(3):
        loaded, problem = store.load("entry", fp)
        assert problem is None and torch.equal(loaded["features"], tensors["features"])
    assert len(hashed) == 1
    # Changed on disk (same size, new bytes and mtime): checked again, and the damage is found.
    data = store.paths("entry")[0]
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1))
    assert store.load("entry", fp) == (None, "checksum mismatch") and len(hashed) == 2


def test_a_split_read_once_is_not_read_again_until_its_files_change(tmp_path, monkeypatch):
    mirror = write_tiny_mirror(tmp_path / "mirror")
    raw = tmp_path / "raw"
    raw_files.prepare_raw(raw, str(mirror), download=False, expected_sizes=TINY_SIZES)
    first = raw_files.load_split(raw, "train", 400)
    parsed = []
    monkeypatch.setattr(raw_files, "parse_idx", lambda *a: parsed.append(a[1]))  # would fail if called
    again = raw_files.load_split(raw, "train", 400)
    assert parsed == [] and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    again[0].zero_()  # a copy of its own: what one trial does to it, the next never sees
    assert torch.equal(raw_files.load_split(raw, "train", 400)[0], first[0])
    monkeypatch.undo()
    # A file replaced (another inode, size or mtime) is read and checked again.
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-784])
    with pytest.raises(FmnistError, match="payload"):
        raw_files.load_split(raw, "train", 400)
