"""A frozen torchvision ResNet backbone plus a new classifier head, as one LightningModule."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fmnist_tl.data import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from fmnist_tl.utils import FmnistError, sha256_file

log = logging.getLogger(__name__)

# Pooled feature width of each supported backbone; one code path builds all of them.
BACKBONES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 1e-4}


def weight_names(backbone: str) -> list[str]:
    return [w.name for w in torchvision.models.get_model_weights(backbone)]


def check_backbone(backbone: str, weights: str | None) -> None:
    if backbone not in BACKBONES:
        raise FmnistError(f"model.backbone={backbone} is not supported; choose one of {', '.join(BACKBONES)}")
    if weights is not None and weights not in weight_names(backbone):
        raise FmnistError(
            f"model.weights={weights} is not a torchvision weights name for {backbone}; "
            f"choose one of {', '.join(weight_names(backbone))} or null for random init"
        )


def load_state_dict_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a file whose pickle would run code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FmnistError(f"{what} {path} refused: not a plain tensor file ({first})") from e
    except Exception as e:  # truncated zip, bad magic, EOF ...
        raise FmnistError(
            f"{what} {path} is corrupt or truncated ({type(e).__name__}: {e}); delete it and fetch it again"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FmnistError(f"{what} {path} is not a state_dict (a dict of tensors)")
    return obj


def load_backbone_state(net: nn.Module, state: dict[str, torch.Tensor], source: str, backbone: str) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        parts = [
            f"{name} keys: {few(keys)}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
            if keys
        ]
        raise FmnistError(
            f"{source} does not fit {backbone}: " + "; ".join(parts) + "; pass weights saved from the same architecture"
        )
    net.load_state_dict(state, strict=True)


def fetch_torchvision_weights(backbone: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """The real torchvision path (download into the torch hub cache), with offline-friendly errors."""
    enum = torchvision.models.get_model_weights(backbone)[weights]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not cached.is_file():
        try:
            enum.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # URLError, HTTPError, socket errors, hash mismatch
            raise FmnistError(
                f"cannot get {backbone} {weights} weights ({type(e).__name__}: {e}); put {cached.name} "
                f"(from {enum.url}) at {cached}, or pass model.weights_path=FILE, or model.weights=null for random init"
            ) from e
    state = load_state_dict_file(cached, "cached torchvision weights")
    return state, f"torchvision:{backbone}.{weights}:sha256={sha256_file(cached)}"


def build_backbone(
    backbone: str, weights: str | None, weights_path: str | None, load: bool = True
) -> tuple[nn.Module, str]:
    """Return the backbone with its classifier replaced by Identity, and an identity string for its weights."""
    check_backbone(backbone, weights)
    net = torchvision.models.get_model(backbone, weights=None)
    identity = "random-init"
    if load and weights_path:
        state = load_state_dict_file(weights_path, "model.weights_path")
        load_backbone_state(net, state, f"model.weights_path {weights_path}", backbone)
        identity = f"file:{Path(weights_path).name}:sha256={sha256_file(weights_path)}"
    elif load and weights:
        state, identity = fetch_torchvision_weights(backbone, weights)
        load_backbone_state(net, state, identity, backbone)
    net.fc = nn.Identity()
    return net, identity


def to_container(x: Any) -> Any:
    """Hydra hands DictConfigs; checkpoints must hold plain containers to load with weights_only=True."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


class TransferClassifier(L.LightningModule):
    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | None = "IMAGENET1K_V1",
        weights_path: str | None = None,
        num_classes: int = 10,
        head: dict | None = None,
        freeze_backbone: bool = True,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = True,
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        head, optimizer, scheduler = to_container(head) or {}, to_container(optimizer), to_container(scheduler)
        mean, std = list(to_container(mean)), list(to_container(std))
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "weights": weights,
                "weights_path": weights_path,
                "num_classes": num_classes,
                "head": head,
                "freeze_backbone": freeze_backbone,
                "optimizer": optimizer or DEFAULT_OPTIMIZER,
                "scheduler": scheduler,
                "image_size": image_size,
                "mean": mean,
                "std": std,
                "channels_last": channels_last,
            }
        )
        self.backbone, self.weights_id = build_backbone(backbone, weights, weights_path, load=load_weights)
        self.feature_dim = BACKBONES[backbone]
        self.head = self._build_head(
            self.feature_dim, num_classes, head.get("hidden_dims", [256]), head.get("dropout", 0.5)
        )
        # Preprocessing lives with the model too, so predict/export rebuild it from the checkpoint alone.
        self.preprocess = ImagePreprocess(image_size, mean, std)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train()  # apply the BatchNorm policy from the start, not only after a train() call
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    @staticmethod
    def _build_head(in_dim: int, num_classes: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [nn.Linear(in_dim, int(width)), nn.ReLU(inplace=True), nn.Dropout(float(dropout))]
            in_dim = int(width)
        layers.append(nn.Linear(in_dim, num_classes))
        return nn.Sequential(*layers)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TransferClassifier:
        """Rebuild from our own checkpoint: config from its hyper-parameters, tensors via weights_only=True."""
        path = Path(path)
        if not path.is_file():
            raise FmnistError(f"checkpoint {path} does not exist")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise FmnistError(
                f"checkpoint {path} refused: it holds objects other than tensors and plain containers"
            ) from e
        except Exception as e:
            raise FmnistError(
                f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); use another checkpoint"
            ) from e
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
            raise FmnistError(f"checkpoint {path} is not an fmnist_tl checkpoint (no state_dict/hyper_parameters)")
        model = cls(**ckpt["hyper_parameters"], load_weights=False)
        model.load_state_dict(ckpt["state_dict"])
        model.weights_id = ckpt.get("weights_id", model.weights_id)
        return model.eval()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["weights_id"] = self.weights_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.weights_id = checkpoint.get("weights_id", self.weights_id)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if self.freeze_backbone:
            # requires_grad=False alone still lets BatchNorm update its running stats in train mode.
            self.backbone.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning restores per-module train/eval flags around validation without calling train(),
        # so enforce the frozen BatchNorm policy here as well.
        self.train(True)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, (B, 2048) for resnet50, from preprocessed images."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # 2-D input is cached backbone features (see features.py); 4-D is preprocessed images.
        return self.head(x.to(self.head[0].weight.dtype)) if x.ndim == 2 else self(x)

    def _step(self, batch, metrics: MetricCollection, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.logits(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        if stage == "train" and not torch.isfinite(loss):
            raise FmnistError(
                f"training diverged: loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower model.optimizer.lr"
            )
        metrics.update(logits.detach().float(), y)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            prog_bar=stage != "test",
            batch_size=len(y),
            sync_dist=stage != "train",
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "test")
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_metrics, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        # Refuse to go on (and so to save last.ckpt) once the weights are no longer finite:
        # ModelCheckpoint saves after this hook, so a diverged model never becomes `last`.
        if self.trainer.sanity_checking:
            return
        bad = [n for n, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise FmnistError(
                f"training diverged: parameter {bad[0]} is not finite after epoch {self.current_epoch}; "
                "lower model.optimizer.lr"
            )

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.logits(x).float().softmax(-1)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt_cfg = dict(self.hparams.optimizer)
        optimizer = instantiate(opt_cfg)(params)
        if not self.hparams.scheduler:
            return optimizer
        sched_cfg = dict(self.hparams.scheduler)
        interval = sched_cfg.pop("interval", "epoch")
        target = sched_cfg["_target_"]
        if target.endswith("OneCycleLR"):
            sched_cfg.setdefault("max_lr", opt_cfg["lr"])
            sched_cfg.setdefault("total_steps", int(self.trainer.estimated_stepping_batches))
            interval = "step"
        elif target.endswith("CosineAnnealingLR") and sched_cfg.get("T_max") is None:
            sched_cfg["T_max"] = max(1, int(self.trainer.max_epochs or 1))
        scheduler = instantiate(sched_cfg)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
