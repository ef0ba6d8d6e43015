"""Head-only checkpoints: a run whose backbone never trains saves its head and the backbone's identity.

The identity (torchvision weights name, weights file, or seeded random init, plus the sha256 of the
backbone's tensors, which is also the feature cache's key) rebuilds the backbone on load and proves it.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from fmnist_tl.core.errors import FmnistError
from fmnist_tl.core.files import module_sha256
from fmnist_tl.training.model import TransferClassifier


def save_like_lightning(model: TransferClassifier, path) -> dict:
    """What Lightning's checkpoint connector writes for the model: its state_dict, hparams, then our hook."""
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.slow
def test_a_trained_runs_checkpoints_hold_the_head_and_the_backbones_identity(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    manifests = [json.loads(p.read_text()) for p in (trained_run.parent / "cache" / "features").glob("*.json")]
    for path in (trained_run / "checkpoints" / "last.ckpt", metrics["best_model_path"]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"head"}
        identity = ckpt["backbone_identity"]
        assert ckpt["weights_id"] == "random-init" and ckpt["hyper_parameters"]["init_seed"] == 42
        # The identity the feature cache keyed its entries by: one shape for both.
        assert [{k: m["fingerprint"][k] for k in identity} for m in manifests] == [identity] * len(manifests)
        model = TransferClassifier.from_checkpoint(path)
        assert module_sha256(model.backbone) == identity["weights_sha256"]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["state_dict"].items())
    # A ResNet18 backbone is 45 MB; the head with its AdamW state is what is left.
    assert (trained_run / "checkpoints" / "last.ckpt").stat().st_size < 3e6


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline torch hub cache holding stand-in resnet18 IMAGENET1K_V1 weights (a random init)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(
        torch.hub, "load_state_dict_from_url", lambda *a, **k: (_ for _ in ()).throw(OSError("offline"))
    )
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(5)
    path = cache / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_torchvision_weights_rebuild_from_the_hub_cache_or_fail_with_the_usual_error(hub, tmp_path):
    model = TransferClassifier(backbone="resnet18", weights="IMAGENET1K_V1", image_size=32)
    save_like_lightning(model, tmp_path / "a.ckpt")
    rebuilt = TransferClassifier.from_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(rebuilt.backbone.conv1.weight, torch.load(hub, weights_only=True)["conv1.weight"])
    assert rebuilt.weights_id == model.weights_id and rebuilt.weights_id.startswith("torchvision:resnet18.")
    hub.unlink()  # another machine, offline, without the weights
    with pytest.raises(FmnistError) as info:
        TransferClassifier.from_checkpoint(tmp_path / "a.ckpt")
    message = str(info.value)
    assert message.startswith(f"checkpoint {tmp_path / 'a.ckpt'} holds the head only; its backbone cannot be rebuilt:")
    assert "cannot get resnet18 IMAGENET1K_V1 weights" in message and str(hub) in message and "\n" not in message


def test_a_weights_file_must_be_there_and_unchanged(tmp_path):
    torch.manual_seed(1)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    model = TransferClassifier(backbone="resnet18", weights=None, weights_path=str(weights), image_size=32)
    save_like_lightning(model, tmp_path / "b.ckpt")
    assert torch.equal(
        TransferClassifier.from_checkpoint(tmp_path / "b.ckpt").backbone.conv1.weight, model.backbone.conv1.weight
    )
    torch.manual_seed(2)  # the file replaced by other weights: the sha256 says so
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    with pytest.raises(FmnistError, match=r"was trained on a backbone with sha256 .* but the one built here has"):
        TransferClassifier.from_checkpoint(tmp_path / "b.ckpt")
    weights.unlink()
    with pytest.raises(FmnistError, match=r"holds the head only; its backbone cannot be rebuilt: .*does not exist"):
        TransferClassifier.from_checkpoint(tmp_path / "b.ckpt")


def test_only_a_backbone_that_never_trains_and_can_be_rebuilt_is_left_out(tmp_path):
    seeded = TransferClassifier(backbone="resnet18", weights=None, image_size=32, init_seed=3)
    again = TransferClassifier(backbone="resnet18", weights=None, image_size=32, init_seed=3)
    assert module_sha256(seeded.backbone) == module_sha256(again.backbone)  # the seed alone rebuilds it
    assert "backbone_identity" in save_like_lightning(seeded, tmp_path / "s.ckpt")
    assert torch.equal(
        TransferClassifier.from_checkpoint(tmp_path / "s.ckpt").backbone.conv1.weight, seeded.backbone.conv1.weight
    )
    unseeded = TransferClassifier(backbone="resnet18", weights=None, image_size=32)  # nothing could rebuild it
    finetuned = TransferClassifier(
        backbone="resnet18", weights=None, image_size=32, init_seed=3, finetune={"start_epoch": 1}
    )
    for model in (unseeded, finetuned):
        ckpt = save_like_lightning(model, tmp_path / "full.ckpt")
        assert "backbone_identity" not in ckpt and any(k.startswith("backbone.") for k in ckpt["state_dict"])


def test_a_head_only_checkpoint_written_before_the_identity_took_one_shape_still_loads(tmp_path):
    """Checkpoints used to record {"weights_id", "sha256"}; now backbones.backbone_identity's shape."""
    model = TransferClassifier(backbone="resnet18", weights=None, image_size=32, init_seed=3)
    ckpt = save_like_lightning(model, tmp_path / "new.ckpt")
    identity = ckpt["backbone_identity"]
    assert sorted(identity) == ["backbone", "image_size", "mean", "std", "weights_sha256"]
    assert (identity["backbone"], identity["image_size"]) == ("resnet18", 32)
    assert identity["weights_sha256"] == module_sha256(model.backbone)
    assert identity["mean"] == pytest.approx([0.485, 0.456, 0.406]) and identity["std"] == pytest.approx(
        [0.229, 0.224, 0.225]
    )
    ckpt["backbone_identity"] = {"weights_id": "random-init", "sha256": module_sha256(model.backbone)}
    torch.save(ckpt, tmp_path / "old.ckpt")
    rebuilt = TransferClassifier.from_checkpoint(tmp_path / "old.ckpt")
    assert torch.equal(rebuilt.backbone.conv1.weight, model.backbone.conv1.weight)
    assert torch.equal(rebuilt.head[0].weight, model.head[0].weight)
    ckpt["backbone_identity"]["sha256"] = "0" * 64  # and the old shape's sha256 is still checked
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(FmnistError, match=r"trained on a backbone with sha256 0000000000000000\.\.\. \(random-init\)"):
        TransferClassifier.from_checkpoint(tmp_path / "bad.ckpt")
