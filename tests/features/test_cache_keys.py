"""Cache keys stay what earlier versions computed: a feature cache or probe record on disk still loads.

The rules below are written out as the code before the backbone identity took one shape had them
(fmnist_tl 0.x: extraction.split_entry, manifest.fingerprint_key, probe.record_key); the current
code must give the same names, and an entry written under them must be a hit.
"""

from __future__ import annotations

import hashlib
import json

import safetensors.torch
import torch

from fmnist_tl.backbones.weights import build_backbone
from fmnist_tl.core.files import module_sha256, tensors_sha256
from fmnist_tl.data.fashion_mnist import ImagePreprocess
from fmnist_tl.features.extraction import split_entry
from fmnist_tl.features.manifest import fingerprint_key
from fmnist_tl.features.probe import probe_fields
from fmnist_tl.features.store import FeatureStore, cached_features
from tests.helpers import tiny_split


def old_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:24]


def old_split_entry(name, sha, pre, precision, store_dtype, split, images, labels):
    fp = {
        "format": 1,
        "backbone": name,
        "weights_sha256": sha,
        "image_size": int(pre.image_size),
        "mean": [round(float(m), 8) for m in pre.mean.flatten().tolist()],
        "std": [round(float(s), 8) for s in pre.std.flatten().tolist()],
        "precision": precision,
        "store_dtype": store_dtype,
        "split": split,
        "data_sha256": tensors_sha256({"images": images, "labels": labels}),
        "count": len(labels),
    }
    return f"{split}-{name}-{pre.image_size}px-{old_key(fp)}", fp


def test_a_feature_cache_entry_written_under_the_old_key_is_still_a_hit(tmp_path):
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet18", None, None)
    pre = ImagePreprocess(32)
    images, labels = tiny_split(20, seed=1)
    images = images.unsqueeze(1)
    old = old_split_entry("resnet18", module_sha256(backbone), pre, "32", "float16", "val", images, labels)
    assert split_entry("resnet18", module_sha256(backbone), pre, "32", "float16", "val", images, labels) == old
    name, fp = old
    stored = torch.randn(len(labels), 512).to(torch.float16)
    FeatureStore(tmp_path).save(
        name,
        {"features": stored, "labels": labels.to(torch.int64)},
        {"fingerprint": fp, "key": old_key(fp), "created": "2026-11-01T00:00:00+0000"},
    )

    def must_not_extract(*a, **k):
        raise AssertionError("a valid old entry was extracted again")

    feats, result = cached_features(
        tmp_path, "val", "resnet18", backbone, pre, images, labels, extractor=must_not_extract
    )
    assert result.status == "hit" and result.entry == name and torch.equal(feats, stored)
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / f"{name}.safetensors"))["features"], stored)


def test_probe_records_keep_their_file_names():
    fields = probe_fields(torch.device("cpu"), "resnet18", 32, 16)
    assert fingerprint_key(fields, 20) == old_key(fields)[:20]
    assert fingerprint_key(fields) == old_key(fields)
