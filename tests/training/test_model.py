from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from fmnist_tl.backbones.weights import build_backbone
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import RunsCode


@pytest.fixture(scope="module")
def resnet50_state(tmp_path_factory) -> Path:
    """A state_dict saved from a randomly initialised torchvision resnet50 (stands in for ImageNet weights)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet50_random.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def test_shapes_resnet50_and_resnet18():
    x = torch.randn(2, 3, 32, 32)
    m50 = TransferClassifier(backbone="resnet50", weights=None, image_size=32).eval()
    assert m50(x).shape == (2, 10)
    assert m50.embed(x).shape == (2, 2048)
    m18 = TransferClassifier(backbone="resnet18", weights=None, image_size=32, head={"hidden_dims": [64, 32]}).eval()
    assert m18.embed(x).shape == (2, 512)
    assert m18(x).shape == (2, 10)
    assert [m.out_features for m in m18.head if isinstance(m, torch.nn.Linear)] == [64, 32, 10]


def test_backbone_frozen_head_trainable_bn_eval():
    m = TransferClassifier(backbone="resnet18", weights=None)
    assert not any(p.requires_grad for p in m.backbone.parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    m.train()
    assert m.training and m.head.training
    assert not any(mod.training for mod in m.backbone.modules())
    m.freeze_backbone = False
    m.train()
    assert m.backbone.training


def test_weights_path_loads_state_dict(resnet50_state):
    expected = torch.load(resnet50_state, weights_only=True)
    m = TransferClassifier(backbone="resnet50", weights=None, weights_path=str(resnet50_state))
    assert torch.equal(m.backbone.conv1.weight, expected["conv1.weight"])
    assert torch.equal(m.backbone.layer4[2].bn3.running_var, expected["layer4.2.bn3.running_var"])
    assert m.weights_id.startswith("file:resnet50_random.pth:sha256=")


def test_weights_path_wrong_architecture_is_clear(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(FmnistError, match=r"does not fit resnet50: .*unexpected keys|does not fit resnet50: .*shape"):
        build_backbone("resnet50", None, str(path))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": RunsCode(str(marker))}, f)
    torch.save({"x": RunsCode(str(marker))}, tmp_path / "evil_zip.pth")
    for p in (path, tmp_path / "evil_zip.pth"):
        with pytest.raises(FmnistError, match="refused"):
            build_backbone("resnet50", None, str(p))
    assert not marker.exists()
    # The payload is live: a plain unpickle would have run it.
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_truncated_weights_file_is_clear(resnet50_state, tmp_path):
    path = tmp_path / "truncated.pth"
    path.write_bytes(resnet50_state.read_bytes()[:100_000])
    with pytest.raises(FmnistError, match="corrupt or truncated.*delete it"):
        build_backbone("resnet50", None, str(path))


def test_missing_imagenet_weights_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(FmnistError) as err:
        build_backbone("resnet50", "IMAGENET1K_V1", None)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in msg
    assert "model.weights_path" in msg and "model.weights=null" in msg


def test_imagenet_weights_from_hub_cache(resnet50_state, tmp_path, monkeypatch):
    """The real torchvision path, fed from the hub cache where a download would have put the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet50-0676ba61.pth").write_bytes(resnet50_state.read_bytes())
    net, identity = build_backbone("resnet50", "IMAGENET1K_V1", None)
    assert identity.startswith("torchvision:resnet50.IMAGENET1K_V1:sha256=")
    assert torch.equal(net.conv1.weight, torch.load(resnet50_state, weights_only=True)["conv1.weight"])
    # A truncated file in the hub cache names the file and says to delete it.
    (cache / "resnet50-0676ba61.pth").write_bytes(resnet50_state.read_bytes()[:5000])
    with pytest.raises(FmnistError, match=r"resnet50-0676ba61.pth is corrupt or truncated.*delete it"):
        build_backbone("resnet50", "IMAGENET1K_V1", None)


def test_unknown_backbone_and_weights_names():
    with pytest.raises(FmnistError, match=r"model.backbone=vgg99 is not a torchvision classifier; did you mean vgg19"):
        build_backbone("vgg99", None, None)
    with pytest.raises(FmnistError, match=r"model.backbone=convnext_tiyn .*did you mean convnext_tiny\b"):
        build_backbone("convnext_tiyn", None, None)
    with pytest.raises(FmnistError, match="model.weights=IMAGENET9K is not a torchvision weights name"):
        build_backbone("resnet50", "IMAGENET9K", None)


def test_predict_step_returns_probabilities():
    m = TransferClassifier(backbone="resnet18", weights=None).eval()
    probs = m.predict_step((torch.randn(3, 3, 32, 32), torch.zeros(3)), 0)
    assert probs.shape == (3, 10)
    assert torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    # Cached 2-D features go straight to the head.
    feats = torch.randn(3, 512)
    assert torch.allclose(m.logits(feats), m.head(feats))


def test_stage_metrics_from_each_steps_classes_equal_per_step_updates_on_logits():
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    from fmnist_tl.training.model import StageMetrics

    g = torch.Generator().manual_seed(0)
    steps = [(torch.randn(37, 10, generator=g), torch.randint(0, 10, (37,), generator=g)) for _ in range(5)]
    metrics = StageMetrics(10)
    for logits, labels in steps:
        metrics.update("val", logits, labels, torch.tensor(0.5), "step")
    got = metrics.compute("val")
    logits, labels = torch.cat([s[0] for s in steps]), torch.cat([s[1] for s in steps])
    assert got["val/acc"] == multiclass_accuracy(logits, labels, 10, average="micro")
    assert got["val/f1"] == multiclass_f1_score(logits, labels, 10, average="macro")
    # The next epoch starts afresh: nothing of this one is carried into it.
    metrics.update("val", logits[:10], labels[:10], torch.tensor(0.5), "step")
    assert metrics.compute("val")["val/acc"] == multiclass_accuracy(logits[:10], labels[:10], 10, average="micro")
