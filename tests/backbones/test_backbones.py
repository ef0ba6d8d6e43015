"""Backbones beyond ResNet: any torchvision classifier by name (fmnist_tl/backbones/registry.py), frozen in
every family, and every shipped model config through cache, train, evaluate, predict and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from fmnist_tl.backbones import registry as backbones
from fmnist_tl.backbones import weights as weights_module
from fmnist_tl.backbones.weights import build_backbone
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.data.fashion_mnist import ImagePreprocess
from fmnist_tl.evaluate import evaluate
from fmnist_tl.export import export
from fmnist_tl.features.extraction import FeatureExtractor
from fmnist_tl.predict import classify, predict
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import REPO, make_entry_cfg, run_cli, tiny_data_overrides, tiny_split, write_tiny_mirror

SHIPPED = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml") if p.stem not in ("resnet18", "resnet50"))
# One small member of each family; the smallest size the family takes (ViT: exactly its own).
FAMILIES = {
    "resnet18": 32,
    "convnext_tiny": 32,
    "efficientnet_b0": 32,
    "mobilenet_v3_small": 32,
    "regnet_y_400mf": 32,
    "swin_t": 32,
    "vit_b_32": 224,
}
# As few images as the pipeline takes (a 10-image val split, a train batch): ViT-B costs ~0.3 s per image.
TINY = {"train": 20, "test": 10}
# Shipped backbones whose end-to-end test extracts with ONNX Runtime, at this precision (the
# others with torch at fp32). int8 on a MobileNet (squeeze-excitation, hardswish): quantising a
# transformer works too, but exporting and calibrating one costs a minute of the suite.
ONNX_EXTRACTION = {"efficientnet_b0": "32", "mobilenet_v3_large": "int8"}


def test_shipped_configs_are_the_ones_the_issue_lists():
    assert SHIPPED == sorted(
        [
            "convnext_tiny",
            "efficientnet_b0",
            "efficientnet_v2_s",
            "mobilenet_v3_large",
            "regnet_y_1_6gf",
            "swin_t",
            "vit_b_16",
        ]
    )


@pytest.mark.parametrize("name", ["squeezenet1_1", "mnasnet0_5", "shufflenet_v2_x0_5"])
def test_surgery_leaves_pooled_features_of_the_discovered_width(name):
    """Families beyond the shipped ones: the classifier is gone and a real forward gives the width the
    meta forward found (SqueezeNet's classifier is a 1x1 conv)."""
    net, _ = build_backbone(name, None, None)
    net.eval()
    width = backbones.feature_dim(name, None, 64)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, width) and width != backbones.IMAGENET_CLASSES
    assert not any(isinstance(m, nn.Linear) and m.out_features == backbones.IMAGENET_CLASSES for m in net.modules())


def test_auxiliary_heads_are_dropped():
    net = backbones.strip_classifier(backbones.new_classifier("googlenet", None, "meta"))
    assert net.aux1 is None and net.aux2 is None and isinstance(net.fc, nn.Identity)
    assert backbones.feature_dim("googlenet", None, 64) == 1024


def test_preprocessing_comes_from_the_weights():
    assert backbones.preprocessing("efficientnet_v2_s", None)[0] == 384  # trained at 384 px
    assert backbones.preprocessing("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")[0] == 384
    size, mean, std = backbones.preprocessing("convnext_tiny", "IMAGENET1K_V1", 64)
    assert size == 64 and mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    with pytest.raises(FmnistError, match=r"model.image_size=64 does not fit vit_b_16 .*use 224"):
        backbones.preprocessing("vit_b_16", None, 64)
    # ViT built for 384 px weights has their position embedding: 384 is its only size.
    with pytest.raises(FmnistError, match=r"model.image_size=224 does not fit vit_b_16 .*use 384"):
        backbones.preprocessing("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", 224)


def test_stages_per_family():
    assert backbones.stage_names("resnet50") == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert backbones.stage_names("convnext_tiny")[:8] == [f"features.{i}" for i in range(8)]
    assert backbones.stage_names("efficientnet_b0") == [f"features.{i}" for i in range(9)]
    vit = backbones.stage_names("vit_b_16")
    assert vit == ["conv_proj", *(f"encoder.layers.encoder_layer_{i}" for i in range(12)), "encoder.ln"]
    assert backbones.stage_names("regnet_y_1_6gf") == ["stem", *(f"trunk_output.block{i}" for i in range(1, 5))]
    # last_K counts blocks; a closing norm layer comes along with the top one.
    assert backbones.last_stages("resnet50", 1) == ["layer4"]
    top_two = ["encoder.layers.encoder_layer_10", "encoder.layers.encoder_layer_11", "encoder.ln"]
    assert backbones.last_stages("vit_b_16", 2) == top_two
    assert backbones.last_stages("swin_t", 1) == ["features.7", "norm"]
    with pytest.raises(FmnistError, match="efficientnet_b0 has 9 stages"):
        backbones.resolve_stages("efficientnet_b0", ["last_10"])
    with pytest.raises(FmnistError, match=r"features.9 is not a stage of convnext_tiny; did you mean features.7"):
        backbones.resolve_stages("convnext_tiny", ["features.9"])


@pytest.mark.parametrize("name", FAMILIES)
def test_a_seeded_random_init_is_the_same_in_every_process(name):
    # A head-only checkpoint rebuilds its random-init backbone from the seed, and the feature cache
    # is keyed by its sha256: the first build in a process (which also learns the architecture's
    # structure on the meta device) must draw the same weights as any later one.
    backbones._built_on_meta.cache_clear()
    backbones._meta_backbone.cache_clear()
    weights_module._BUILT.clear()
    first = build_backbone(name, None, None, init_seed=7)[0].state_dict()
    torch.manual_seed(7)
    again = backbones.strip_classifier(backbones.new_classifier(name)).state_dict()
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("name, size", FAMILIES.items(), ids=list(FAMILIES))
def test_frozen_part_runs_in_eval_mode_in_every_family(name, size):
    """Training mode of a frozen backbone: no dropout, no stochastic depth, no BatchNorm statistics.
    In the fine-tune phase the top stage's dropout and stochastic depth run, its BatchNorm stays frozen."""
    torch.manual_seed(0)
    m = TransferClassifier(backbone=name, weights=None, image_size=size, channels_last=False)
    x = torch.randn(4, 3, size, size)
    m.eval()
    with torch.no_grad():
        want = m.embed(x)
        m.train()
        assert not any(mod.training for mod in m.backbone.modules())
        assert torch.equal(m.embed(x), want) and torch.equal(m.embed(x), want)
    tuned = TransferClassifier(backbone=name, weights=None, image_size=size, finetune={"start_epoch": 0})
    tuned.train()  # no trainer: epoch 0, so the fine-tune phase is on
    top = {n for n in backbones.last_stages(name, 1)}
    in_top = {n for n, _ in tuned.backbone.named_modules() if any(n == t or n.startswith(f"{t}.") for t in top)}
    batchnorm = {n for n, mod in tuned.backbone.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)}
    assert {n for n, mod in tuned.backbone.named_modules() if mod.training} == in_top - batchnorm
    trainable = {n for n, p in tuned.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(any(n.startswith(f"{t}.") for t in top) for n in trainable)


def with_batchnorm_statistics(name: str, size: int) -> nn.Module:
    """A random-init classifier with the BatchNorm statistics of preprocessed images (the running
    stats a pre-trained net has of its data). With torchvision's init alone, eval-mode BatchNorm
    normalises nothing and EfficientNet and MobileNet features shrink to ~1e-13: no direction to
    compare, and logits that are the head's bias whatever the backbone computes."""
    torch.manual_seed(0)
    net = backbones.new_classifier(name)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average: this batch's statistics
    preprocess = ImagePreprocess(*backbones.preprocessing(name, None, size))
    net.train()
    with torch.no_grad():
        net(preprocess(tiny_split(32, 11)[0].unsqueeze(1)))
    return net.eval()


def has_batchnorm(net: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("name, size", FAMILIES.items(), ids=list(FAMILIES))
def test_every_family_extracts_at_every_torch_precision(name, size):
    """The torch extraction path (channels_last, autocast) runs each family at bf16 and fp16 with
    finite features pointing where fp32's do (ONNX Runtime fp32 and int8 run in the shipped-backbone tests)."""
    torch.manual_seed(0)
    model = TransferClassifier(backbone=name, weights=None, image_size=size)
    # Drawn fan-in, every conv has unit gain, so that every family's features have a direction
    # (torchvision's fan-out init leaves random EfficientNet and MobileNet features ~1e-13).
    for module in model.backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in")
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def features(precision: str) -> torch.Tensor:
        return FeatureExtractor(model.backbone, model.preprocess, precision=precision, compile=False, progress=False)(
            images
        )

    fp32 = features("32")
    for precision in ("bf16", "16"):
        out = features(precision)
        assert out.shape == fp32.shape and out.dtype == torch.float32 and torch.isfinite(out).all(), precision
        assert torch.nn.functional.cosine_similarity(out, fp32).min() > 0.999, precision


@pytest.fixture(scope="module")
def small_mirror(tmp_path_factory) -> Path:
    return write_tiny_mirror(tmp_path_factory.mktemp("mirror"), TINY)


def small_overrides(mirror: Path, tmp: Path) -> list[str]:
    return [
        *tiny_data_overrides(mirror, tmp),
        f"data.expected_sizes.train={TINY['train']}",
        f"data.expected_sizes.test={TINY['test']}",
        "data.val_size=10",
        "data.batch_size=10",
        "data.eval_batch_size=10",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_backbone_caches_trains_evaluates_predicts_and_exports(name, small_mirror, tmp_path):
    from fmnist_tl.train import train

    # At the smallest size the architecture takes (ViT: its own 224), random init; nets with
    # BatchNorm from a state_dict file (model.weights=<file>) holding the statistics of real images.
    size = "null" if name.startswith("vit") else "32"
    weights = "null"
    if has_batchnorm(backbones.new_classifier(name, None, "meta")):  # random weights with a size and a direction
        weights = str(tmp_path / f"{name}-random.pth")
        torch.save(with_batchnorm_statistics(name, 32).state_dict(), weights)
    overrides = [
        *small_overrides(small_mirror, tmp_path),
        f"model={name}",
        f"model.weights={weights}",
        f"model.image_size={size}",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        # Both extraction backends and int8 across the families (fp32 elsewhere: the torch model is
        # the reference). Random init at 32 px: int8 is checked for plumbing here, not for fidelity.
        f"features.backend={'onnxruntime' if name in ONNX_EXTRACTION else 'torch'}",
        f"features.precision={ONNX_EXTRACTION.get(name, '32')}",
        "features.calibration_images=8",
        "features.gate_images=8",
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
    ]
    metrics = train(make_entry_cfg("train", overrides, tmp_path / "run"))
    model = TransferClassifier.from_checkpoint(metrics["best_model_path"])
    assert model.hparams.backbone == name and metrics["backbone"] == name
    # Features with a size and a direction, so that the parity checks below compare something.
    with torch.no_grad():
        assert model.eval().embed(model.preprocess(tiny_split(4, 5)[0].unsqueeze(1))).norm(dim=1).min() > 1e-3
    assert model.head[0].in_features == backbones.feature_dim(name, None, model.hparams.image_size)
    # The head trained on cached features, keyed by backbone (and its weights' sha256).
    assert {r["status"] for r in metrics["feature_cache"].values()} == {"extracted"}
    extraction = metrics["extraction"]
    assert (extraction["backend"], extraction["precision"]) == (
        ("onnxruntime", ONNX_EXTRACTION[name]) if name in ONNX_EXTRACTION else ("torch", "32")
    )
    entries = {Path(r["entry"]).name for r in metrics["feature_cache"].values()}
    assert all(
        e.startswith(f"{split}-{name}-{model.hparams.image_size}px")
        for e, split in zip(sorted(entries), sorted(metrics["feature_cache"]), strict=True)
    )

    ckpt = f"ckpt_path={metrics['best_model_path']}"
    data = [*small_overrides(small_mirror, tmp_path), "trainer.accelerator=cpu", "trainer.precision=32-true"]
    report = evaluate(make_entry_cfg("evaluate", [*data, ckpt], tmp_path / "eval"))
    assert report["num_samples"] == TINY["test"] and abs(report["accuracy"] - metrics["test/acc"]) <= 1e-6

    images, _ = tiny_split(3, 7)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image.numpy(), "L").save(paths[-1])
    results = predict(paths, metrics["best_model_path"], top_k=1)
    probs = classify(model, images.unsqueeze(1))
    assert [r.top[0][1] for r in results] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)

    export_args = [*small_overrides(small_mirror, tmp_path), ckpt, "format=onnx", "verify.num_images=4"]
    record = export(make_entry_cfg("export", export_args, tmp_path / "export"))
    assert record["verification"]["num_images"] == 4 and record["verification"]["top1_agreement"] == 1.0
    assert record["verification"]["max_abs_logit_diff"] < 1e-3


@pytest.mark.slow
def test_unknown_backbone_is_one_line_with_close_matches():
    proc = run_cli("model.backbone=convnext_tiyn")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: model.backbone=convnext_tiyn is not a torchvision classifier; did you mean convnext_tiny")
    )


def test_model_weights_may_name_a_state_dict_file(tmp_path):
    path = tmp_path / "convnext.pth"
    torch.manual_seed(3)
    reference = backbones.new_classifier("convnext_tiny")
    torch.save(reference.state_dict(), path)
    model = TransferClassifier(backbone="convnext_tiny", weights=str(path), image_size=32)
    assert model.weights_id.startswith("file:convnext.pth:sha256=")
    assert torch.equal(model.backbone.features[0][0].weight, reference.features[0][0].weight)
    assert model.hparams.image_size == 32 and model.hparams.mean == pytest.approx([0.485, 0.456, 0.406])
