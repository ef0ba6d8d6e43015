"""Feature extraction (fmnist_tl/features/extraction.py), the on-disk feature cache (feature_store.py) and the
FeatureCache callback with its on/off policy (features.py)."""

from __future__ import annotations

import gzip
import json
import logging
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

from fmnist_tl.backbones.weights import build_backbone
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.core.files import module_sha256
from fmnist_tl.data.fashion_mnist import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess, holds_features
from fmnist_tl.data.raw_files import IDX_FILES
from fmnist_tl.features.cache import FeatureCache, feature_cache_for
from fmnist_tl.features.extraction import FeatureExtractor, extraction_settings
from fmnist_tl.features.store import CacheResult, FeatureStore, cached_features
from fmnist_tl.runtime.build import build
from fmnist_tl.runtime.checks import validate_config
from fmnist_tl.train import train
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import REPO, attached, idx_bytes, make_cfg, tiny_overrides, tiny_split

N = 48


def make_backbone(name: str = "resnet18", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(name, None, None)[0]


@pytest.fixture(scope="module")
def nets() -> dict[str, nn.Module]:
    return {"base": make_backbone(), "reseeded": make_backbone(seed=1), "resnet34": make_backbone("resnet34")}


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = tiny_split(N, seed=3)
    return images.unsqueeze(1), labels.long()


def lookup(cache, nets, data, *, change: str | None = None) -> tuple[torch.Tensor, CacheResult]:
    """Features through the cache with the base settings, or with one fingerprint input changed."""
    images, labels = data
    kw = dict(split="train", backbone_name="resnet18", backbone=nets["base"], precision="32", store_dtype="auto")
    size, mean, std = 32, IMAGENET_MEAN, IMAGENET_STD
    if change == "backbone":
        kw.update(backbone_name="resnet34", backbone=nets["resnet34"])
    elif change == "weights":
        kw.update(backbone=nets["reseeded"])
    elif change == "image_size":
        size = 40
    elif change == "mean":
        mean = (0.5, 0.5, 0.5)
    elif change == "std":
        std = (0.5, 0.5, 0.5)
    elif change == "precision":
        kw.update(precision="bf16")
    elif change == "store_dtype":
        kw.update(store_dtype="float32")
    elif change == "data":
        images = images.clone()
        images[0, 0, 0, 0] ^= 1
    elif change == "labels":
        labels = labels.clone()
        labels[0] = (labels[0] + 1) % 10
    elif change == "split":
        kw.update(split="val")
    elif change == "subset":
        images, labels = images[:-1], labels[:-1]
    pre = ImagePreprocess(size, mean, std)
    return cached_features(cache, images=images, labels=labels, preprocess=pre, compile=False, progress=False, **kw)


def test_hit_after_extract_and_features_match_direct_extraction(tmp_path, nets, data):
    feats, first = lookup(tmp_path, nets, data)
    assert first.status == "extracted" and feats.shape == (N, 512) and feats.dtype == torch.float16
    again, second = lookup(tmp_path, nets, data)
    assert second.status == "hit"
    assert torch.equal(again, feats)
    with torch.no_grad():
        direct = nets["base"].eval()(ImagePreprocess(32)(data[0]))
    torch.testing.assert_close(again.float(), direct, rtol=2e-3, atol=2e-3 * float(direct.abs().max()))
    manifest = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert manifest["shape"] == [N, 512] and manifest["fingerprint"]["weights_sha256"] == module_sha256(nets["base"])
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob(".*.tmp"))


KEY_INPUTS = ["backbone", "weights", "image_size", "mean", "std", "precision", "store_dtype"]
KEY_INPUTS += ["data", "labels", "split", "subset"]


@pytest.mark.parametrize("change", KEY_INPUTS)
def test_each_key_input_misses_and_old_entry_stays(tmp_path, nets, data, change):
    assert lookup(tmp_path, nets, data)[1].status == "extracted"
    assert lookup(tmp_path, nets, data, change=change)[1].status == "extracted"
    assert lookup(tmp_path, nets, data, change=change)[1].status == "hit"
    assert lookup(tmp_path, nets, data)[1].status == "hit"


def test_random_init_identity_is_deterministic():
    assert module_sha256(make_backbone(seed=5)) == module_sha256(make_backbone(seed=5))
    assert module_sha256(make_backbone(seed=5)) != module_sha256(make_backbone(seed=6))
    # Memory layout does not change the identity (the model keeps its backbone channels_last).
    net = make_backbone(seed=5)
    assert module_sha256(net.to(memory_format=torch.channels_last)) == module_sha256(make_backbone(seed=5))


def corrupt(store: FeatureStore, name: str, how: str) -> None:
    data_path, manifest_path, _ = store.paths(name)
    if how == "flipped_byte":
        blob = bytearray(data_path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        data_path.write_bytes(bytes(blob))
    elif how == "truncated":
        data_path.write_bytes(data_path.read_bytes()[:-1000])
    elif how == "manifest_garbage":
        manifest_path.write_text('{"fingerprint": ')
    elif how == "manifest_missing":
        manifest_path.unlink()
    elif how == "data_missing":
        data_path.unlink()


@pytest.mark.parametrize("how", ["flipped_byte", "truncated", "manifest_garbage", "manifest_missing", "data_missing"])
def test_corrupt_entry_is_reported_once_and_rebuilt(tmp_path, nets, data, how, caplog):
    feats, first = lookup(tmp_path, nets, data)
    corrupt(FeatureStore(tmp_path), first.entry, how)
    with caplog.at_level(logging.INFO, logger="fmnist_tl.features.store"):
        rebuilt, result = lookup(tmp_path, nets, data)
    assert result.status == "rebuilt"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    assert torch.equal(rebuilt, feats)
    assert lookup(tmp_path, nets, data)[1].status == "hit"


def test_unwritable_cache_dir_is_a_one_line_error(tmp_path, nets, data):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(FmnistError, match=r"feature cache .*file/sub: cannot write .*set paths.cache_dir"):
        lookup(blocker / "sub", nets, data)


CONCURRENT_SCRIPT = """
import json, sys, time
from pathlib import Path
import torch
from fmnist_tl.data.fashion_mnist import ImagePreprocess
from fmnist_tl.features.store import cached_features
from fmnist_tl.backbones.weights import build_backbone

cache, me, other = sys.argv[1:4]
torch.manual_seed(0)
net, _ = build_backbone("resnet18", None, None)
images = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
labels = torch.arange(512) % 10
# Start line: both processes look at the empty cache at the same moment.
Path(me).touch()
while not Path(other).exists():
    time.sleep(0.005)
feats, result = cached_features(cache, "train", "resnet18", net, ImagePreprocess(32), images, labels,
                                compile=False, progress=False)
print(json.dumps({"status": result.status, "sum": float(feats.float().sum())}))
"""


@pytest.mark.slow
def test_two_concurrent_processes_extract_once(tmp_path):
    cache = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, str(cache), str(tmp_path / me), str(tmp_path / other)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-2000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(o["status"] for o in outs) == ["extracted", "hit"]
    assert outs[0]["sum"] == outs[1]["sum"]
    assert len(list(cache.glob("*.safetensors"))) == 1


def test_cached_logits_equal_image_logits(tmp_path, data):
    torch.manual_seed(0)
    model = TransferClassifier(backbone="resnet18", weights=None, image_size=32).eval()
    images, labels = data
    pre = ImagePreprocess(32)
    with torch.no_grad():
        from_images = model.logits(pre(images))
        for precision, store, rel in (("bf16", torch.bfloat16, 3e-2), ("32", torch.float16, 2e-3)):
            feats, _ = cached_features(
                tmp_path, "val", "resnet18", model.backbone, pre, images, labels, precision=precision, progress=False
            )
            assert feats.dtype == store
            from_cache = model.logits(feats)
            scale = float(from_images.abs().max())
            torch.testing.assert_close(from_cache, from_images, rtol=rel, atol=rel * scale)
            assert (from_cache.argmax(1) == from_images.argmax(1)).float().mean() >= 0.95


def test_the_datamodule_serves_a_split_of_cached_features_as_it_is(tiny_cfg):
    cfg = tiny_cfg()
    dm = build(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    attached(dm, build(cfg.model, _recursive_=False))  # the images are preprocessed by the trainer's model
    images, labels = dm.split_tensors("val")
    preprocessed, _ = dm.on_after_batch_transfer((images[:4], labels[:4]), 0)
    assert not holds_features(images) and not holds_features(preprocessed) and preprocessed.shape[1] == 3
    feats = torch.randn(len(labels), 8)
    with pytest.raises(FmnistError, match=r"cached val features must be 2-D \(N, D\), got shape"):
        dm.use_cached_features("val", feats.unsqueeze(1))
    dm.use_cached_features("val", feats)
    served, served_labels = dm.split_tensors("val")
    assert holds_features(served) and torch.equal(served, feats) and torch.equal(served_labels, labels)
    batch, _ = dm.on_after_batch_transfer((feats[:4], labels[:4]), 0)
    assert torch.equal(batch, feats[:4])  # no preprocessing: features go to the head as they are
    assert dm.image_splits["val"][0] is images  # the images stay reachable for reports


def test_compile_failure_falls_back_to_eager_with_one_log_line(monkeypatch, caplog, data):
    def broken_compile(fn, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler\nmore details")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    net, pre = make_backbone(), ImagePreprocess(32)
    extractor = FeatureExtractor(net, pre, compile=True, batch_size=32, progress=False)
    with caplog.at_level(logging.WARNING, logger="fmnist_tl.features.extraction"):
        feats = extractor(data[0])
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile failed (RuntimeError: no C++ compiler); extracting eagerly"
    ]
    assert not extractor.compiled_used
    torch.testing.assert_close(feats, net.eval()(pre(data[0])), rtol=1e-4, atol=1e-4)


def test_compile_decision_scales_with_pixels():
    net = nn.Identity()
    at224 = FeatureExtractor(net, ImagePreprocess(224), compile="auto", compile_min_images=4000)
    at32 = FeatureExtractor(net, ImagePreprocess(32), compile="auto", compile_min_images=4000)
    assert at224.should_compile(5000) and not at224.should_compile(1000)
    assert not at32.should_compile(60000)  # 60k at 32 px is ~1.2k images' worth of work at 224
    assert not FeatureExtractor(net, ImagePreprocess(224), compile=False).should_compile(10**6)


def test_a_smaller_split_reuses_the_compiled_function(monkeypatch, data):
    # train (big) compiles; val/test (below compile_min_images) reuse it instead of going eager.
    compiles = []

    def recording_compile(fn, **kwargs):
        compiles.append(fn)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    extractor = FeatureExtractor(
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        ImagePreprocess(224),
        compile="auto",
        compile_min_images=40,
        batch_size=16,
        progress=False,
    )
    extractor(data[0][:48])
    assert extractor.compiled_used and len(compiles) == 1
    extractor(data[0][:8])  # 8 images alone would not be worth a compile
    assert extractor.compiled_used and len(compiles) == 1


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


@pytest.mark.slow
def test_compiled_extraction_matches_eager(data):
    torch.manual_seed(0)
    net, pre = TinyNet().eval(), ImagePreprocess(32)
    eager = FeatureExtractor(net, pre, compile=False, batch_size=20, progress=False)(data[0])
    compiled = FeatureExtractor(net, pre, compile=True, batch_size=20, progress=False)
    feats = compiled(data[0])  # 48 images in batches of 20: the last one is padded, no recompile
    assert compiled.compiled_used
    torch.testing.assert_close(feats, eager, rtol=1e-4, atol=1e-5)


def test_backbone_found_off_the_device_is_moved_back_outside_inference_mode(data):
    # Lightning moves the model to the CPU after fit; the test stage's extraction must move it back
    # without making inference tensors (loading the best checkpoint into those fails). On a CPU-only
    # machine the move is forced by a device that compares unequal (cpu:0 vs cpu).
    net, pre = TinyNet().eval(), ImagePreprocess(32)
    extractor = FeatureExtractor(net, pre, compile=False, batch_size=20, progress=False)
    extractor.device = torch.device("cpu", 0)
    moves = []
    original_to = net.to

    def recording_to(*args, **kwargs):
        moves.append(torch.is_inference_mode_enabled())
        return original_to(*args, **kwargs)

    net.to = recording_to
    extractor(data[0])
    assert moves == [False]
    assert not any(t.is_inference() for t in net.state_dict().values())


# --------------------------------------------------------------------------------------------
# Wiring into training


@pytest.mark.parametrize(
    "overrides, expect_on, reason",
    [
        ([], True, "Feature cache on"),
        (["data.augment=true"], False, "augmentation is on"),
        (["model.freeze_backbone=false"], False, "the backbone is trainable"),
        (["debug=fdr"], False, "fast_dev_run"),
        (["data.cache_features=false"], False, "data.cache_features=false"),
    ],
)
def test_cache_features_auto_decision_is_logged(tiny_cfg, caplog, overrides, expect_on, reason):
    cfg = tiny_cfg(*overrides)
    model, dm = build(cfg.model, _recursive_=False), build(cfg.data)
    with caplog.at_level(logging.INFO, logger="fmnist_tl.features"):
        cache = feature_cache_for(cfg, model, dm)
    assert isinstance(cache, FeatureCache) == expect_on
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and reason in lines[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("features.precision=fp8", "features.precision='fp8' must be one of"),
        ("features.store_dtype=int8", "features.store_dtype='int8' must be one of"),
        ("features.compile=maybe", "features.compile='maybe' must be one of auto, true, false"),
        ("features.batch_size=0", "features.batch_size=0 must be an integer >= 1 or null"),
        ("+features.typo=1", "unknown config key 'features.typo'"),
        ("data.cache_features=sometimes", "data.cache_features='sometimes' must be one of auto, true, false"),
    ],
)
def test_bad_feature_settings_are_one_line_errors(tiny_cfg, override, message):
    with pytest.raises(FmnistError, match=re.escape(message)):
        validate_config(tiny_cfg(override))


def test_extraction_settings_check_a_plain_mapping():
    """Code that builds the settings from a dict (not a composed config) gets the schema's checks too."""
    assert extraction_settings({"batch_size": 8}).batch_size == 8
    with pytest.raises(FmnistError, match=re.escape("unknown config key 'features.typo'")):
        extraction_settings({"typo": 1})
    with pytest.raises(FmnistError, match=re.escape("features.batch_size=0 must be an integer >= 1 or null")):
        extraction_settings({"batch_size": 0})


def test_cache_features_true_with_augmentation_is_an_error(tiny_cfg):
    cfg = tiny_cfg("data.cache_features=true", "data.augment=true")
    with pytest.raises(FmnistError, match="data.cache_features=true but train-time augmentation is on"):
        feature_cache_for(cfg, build(cfg.model, _recursive_=False), build(cfg.data))


def faint_split(n: int, seed: int, contrast: int = 170) -> tuple[torch.Tensor, torch.Tensor]:
    """Like the tiny fixture's classes but faint in noise, so one epoch lands mid-way (~60% val acc).

    On the usual tiny data both paths reach ~100% and would agree however different they were.
    """
    g = torch.Generator().manual_seed(1234)
    templates = (torch.rand(10, 28, 28, generator=g) > 0.6).float()
    g.manual_seed(seed)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    noise = torch.rand(n, 28, 28, generator=g) * (255 - contrast)
    return (templates[labels] * contrast + noise).round().to(torch.uint8), labels.to(torch.uint8)


@pytest.fixture(scope="module")
def faint_mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("faint")
    splits = {"train": faint_split(800, 0), "test": faint_split(200, 1)}
    for stem, kind, split in IDX_FILES:
        images, labels = splits[split]
        (root / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(kind, images if kind == "images" else labels)))
    return root


@pytest.mark.slow
def test_cached_and_uncached_runs_reach_same_val_acc(faint_mirror, tmp_path):
    def run(cache: str, output: str) -> dict:
        overrides = tiny_overrides(faint_mirror, tmp_path) + [
            "data.expected_sizes={train: 800, test: 200}",
            "data.val_size=400",  # 0.5 accuracy points = 2 images
            f"data.cache_features={cache}",
            # fp32 features, as the uncached fp32 run sees them: this compares the two paths, not
            # storage rounding (test_cached_logits_equal_image_logits covers the 16-bit store).
            "features.store_dtype=float32",
        ]
        return train(make_cfg(overrides, tmp_path / output))

    cached = run("true", "cached")
    assert {v["status"] for v in cached["feature_cache"].values()} == {"extracted"}
    uncached = run("false", "uncached")
    assert uncached["feature_cache"] == "off"
    assert 0.3 < uncached["val/acc"] < 0.9  # mid-way, where a difference between the paths would show
    assert abs(cached["val/acc"] - uncached["val/acc"]) <= 0.005, (cached["val/acc"], uncached["val/acc"])
    assert abs(cached["test/acc"] - uncached["test/acc"]) <= 0.01
    # Same seed, warm cache: every split is a hit and the result is the same.
    again = run("auto", "again")
    assert {v["status"] for v in again["feature_cache"].values()} == {"hit"}
    assert again["val/acc"] == cached["val/acc"]
    # The checkpoint of the cached run is the whole model: it predicts from images.
    model = TransferClassifier.from_checkpoint(cached["best_model_path"])
    images, labels = faint_split(200, 1)
    with torch.no_grad():
        acc = (model(model.preprocess(images.unsqueeze(1))).argmax(1) == labels.long()).float().mean().item()
    assert abs(acc - cached["test/acc"]) <= 0.01


# DDP (trainer=ddp_sim) with the cache on: tests/test_train.py::test_ddp_sim_two_processes.
