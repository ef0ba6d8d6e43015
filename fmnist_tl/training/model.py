"""The LightningModule: a torchvision backbone, frozen or fine-tuned from an epoch on, a new
classifier head, and the preprocessing the backbone's weights expect.

The model owns its preprocessing (image size, mean/std, channels_last), as timm's pretrained
configs travel with their weights: its hyper-parameters, and so every checkpoint, carry it, and
the datamodule, the feature cache, prediction and export all run `model.preprocess`. They carry
what it was trained on as well: `class_names` and `input_spec` (the datamodule's uint8 images:
kind, channels, height, width), taken from the datamodule in `setup` (fmnist_tl/training/trained_on.py);
the report, `predict` and `export` read them from the checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fmnist_tl.backbones import (
    backbone_identity,
    build_backbone_of,
    feature_dim,
    fill_rebuilt_backbone,
    init_from_state,
    preprocessing,
    read_checkpoint,
    rebuildable,
    restore_backbone,
    set_frozen_modes,
    strip_backbone,
    weights_memo_key,
    weights_sha256,
)
from fmnist_tl.config import to_container
from fmnist_tl.core import FmnistError, skip_nvml_retries_without_a_driver
from fmnist_tl.data import ImagePreprocess, holds_features
from fmnist_tl.training.checkpoints import CURVE_LOGS, FitHistory
from fmnist_tl.training.finetune import check_finetune, finetune_options, phase_message
from fmnist_tl.training.lr_plan import LRPlan, configure_model_optimization, legacy_lr_plan
from fmnist_tl.training.trained_on import TrainedOn, check_resumed, checked_identity, with_legacy_identity

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 1e-4}


def build_head(in_dim: int, num_classes: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
    """The classifier head: Linear-ReLU-Dropout per hidden width, then Linear to the classes."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, int(width)), nn.ReLU(inplace=True), nn.Dropout(float(dropout))]
        in_dim = int(width)
    layers.append(nn.Linear(in_dim, num_classes))
    return nn.Sequential(*layers)


def check_finite_parameters(module: nn.Module, epoch: int) -> None:
    bad = [n for n, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise FmnistError(
            f"training diverged: parameter {bad[0]} is not finite after epoch {epoch + 1}; lower model.optimizer.lr"
        )


class StageMetrics(nn.Module):
    """Accuracy and macro-F1 of each stage (train/val/test), the train loss's epoch mean, and the
    divergence check of the train loss.

    Metric updates wait for the epoch's end: a step keeps its predicted classes, and the epoch
    makes one update (torchmetrics' per-step update costs more than a head step on cached features,
    and on CUDA its bincount reads the max back). On CUDA the non-finite-loss count waits too.
    Metrics are computed once per epoch rather than passed to log_dict on every step: Lightning's
    per-step handling of Metric objects is a large part of a head step on cached features.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        # validate_args=False: labels are checked once when the IDX files load; the per-step
        # checks (torch.unique on the targets) force a GPU sync on every step.
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
            }
        )
        self.train_metrics, self.val_metrics = metrics.clone(prefix="train/"), metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # nan_strategy="disable": its NaN check syncs a GPU every step; `update` catches a non-finite loss.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self._nonfinite_steps: torch.Tensor | None = None
        self._deferred: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def update(self, stage: str, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, where: str) -> None:
        on_cuda = loss.device.type == "cuda"
        if stage == "train" and on_cuda:
            bad = (~torch.isfinite(loss)).int()
            self._nonfinite_steps = bad if self._nonfinite_steps is None else self._nonfinite_steps + bad
        elif stage == "train" and not torch.isfinite(loss):
            raise FmnistError(f"training diverged: loss is {loss.item()} at {where}; lower model.optimizer.lr")
        # The class indices give the same counts as the logits would (torchmetrics takes their argmax).
        self._deferred.setdefault(stage, []).append((logits.detach().argmax(1), labels))
        if stage == "train":
            self.train_loss.update(loss.detach())

    def train_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's train loss, accuracy and F1; none when this process trained no batch of it.

        A run resumed from a checkpoint saved in the epoch's validation starts after its training
        batches: their figures were held in memory only, and a metric of no batches is no figure.
        """
        if not self._deferred.get("train"):
            return {}
        return {"train/loss_epoch": self.train_loss_of_epoch(epoch), **self.compute("train")}

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        """The stage's metrics over the epoch (synced across DDP ranks by compute()), then reset."""
        metrics, deferred = getattr(self, f"{stage}_metrics"), self._deferred.pop(stage, None)
        if deferred:  # one update with the epoch's predictions instead of one per step
            metrics.update(torch.cat([p for p, _ in deferred]), torch.cat([t for _, t in deferred]))
        values = metrics.compute()
        metrics.reset()
        return values

    def train_loss_of_epoch(self, epoch: int) -> torch.Tensor:
        bad, self._nonfinite_steps = self._nonfinite_steps, None
        if bad is not None and int(bad) > 0:
            raise FmnistError(
                f"training diverged: the loss was not finite in {int(bad)} steps of epoch {epoch + 1}; "
                "lower model.optimizer.lr"
            )
        value = self.train_loss.compute()
        self.train_loss.reset()
        return value


class TransferClassifier(TrainedOn, L.LightningModule):
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
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = True,
        finetune: dict | None = None,
        load_weights: bool = True,
        init_seed: int | None = None,
        class_names: Sequence[str] | None = None,
        input_spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        head = to_container(head) or {}
        class_names, input_spec = checked_identity(class_names, to_container(input_spec), num_classes)
        self.finetune = finetune_options(finetune, backbone)
        self.finetune_start = self.finetune.first_epoch  # first epoch that trains finetune.unfreeze; None: never
        # No file check: a model rebuilt from its checkpoint (load_weights=False) never reads init_from.
        check_finetune(self.finetune, freeze_backbone, max_epochs=None, check_files=False)
        optimizer, scheduler = to_container(optimizer) or DEFAULT_OPTIMIZER, to_container(scheduler)
        # None: what the weights were trained with (backbones.preprocessing); checkpoints hold the values.
        image_size, mean, std = preprocessing(backbone, weights, image_size, to_container(mean), to_container(std))
        finetune = self.finetune.as_dict()
        # The arguments as they are now: plain containers, so that checkpoints load with weights_only=True.
        self.save_hyperparameters(ignore=["load_weights"])
        init_from = self.finetune.init_from if load_weights else None
        # Weights from init_from replace the backbone's anyway: no need to fetch ImageNet weights first.
        load = load_weights and not init_from
        # The backbone before the head: an unseeded run draws both inits from the global RNG in this order.
        self.backbone, self.weights_id = build_backbone_of(self.hparams, load)
        self._weights_memo_key = weights_memo_key(backbone, weights, weights_path, load, init_seed)
        hidden_dims, dropout = head.get("hidden_dims", [256]), head.get("dropout", 0.5)
        self.head = build_head(feature_dim(backbone, weights, image_size), num_classes, hidden_dims, dropout)
        # What the backbone's weights expect; every path from uint8 images to the backbone runs it.
        self.preprocess = ImagePreprocess(image_size, mean, std)
        self.freeze_backbone = freeze_backbone
        self._set_weights(init_from)
        self._finetune_announced = False
        self.lr_plan: LRPlan | None = None  # set by configure_optimizers
        self._saved_lr_plan: dict[str, Any] | None = None  # the resumed checkpoint's
        self.history = FitHistory()  # the CSV logs of its epochs, which checkpoints record (curves.png)
        self.metrics = StageMetrics(num_classes)
        self.train()  # apply the BatchNorm policy from the start, not only after a train() call

    def _set_weights(self, init_from: str | None) -> None:
        """Start from init_from when set; freeze the backbone, make the stages to fine-tune trainable."""
        if init_from:
            state, self.weights_id = init_from_state(init_from, self.hparams, self.state_dict())
            self.load_state_dict(state, strict=True)
            log.info("Initialised from %s", init_from)
        if self.freeze_backbone:
            self.backbone.requires_grad_(False)
        for stage in self.finetune_stages:
            # Trainable from the start, so DDP registers the same parameter set on every rank for the
            # whole run; before finetune_start they get no gradient (embed) and an LR of 0 (optimizer).
            stage.requires_grad_(True)
        if self.hparams.channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TransferClassifier:
        """Rebuild from our own checkpoint: config from its hyper-parameters, tensors via weights_only=True."""
        return rebuild_from_checkpoint(cls, path, map_location)

    @property
    def finetune_stages(self) -> list[nn.Module]:
        """The backbone stages a fine-tune phase trains (empty for a head-only run)."""
        if self.finetune_start is None:
            return []
        return [self.backbone.get_submodule("" if name == "all" else name) for name in self.finetune.unfreeze]

    @property
    def finetune_active(self) -> bool:
        """True from epoch `finetune_start` on: the unfrozen stages get gradients, BN follows finetune.bn."""
        return self.finetune_start is not None and self.current_epoch >= self.finetune_start

    @property
    def backbone_frozen_for_good(self) -> bool:
        """True when no epoch of this run trains the backbone: its checkpoints then hold the head only."""
        return self.freeze_backbone and self.finetune_start is None

    @property
    def weights_sha256(self) -> str:
        """sha256 of the backbone's tensors (the feature cache's key), hashed once while they cannot change."""
        return weights_sha256(self.backbone, self._weights_memo_key if self.backbone_frozen_for_good else None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["weights_id"] = self.weights_id
        if self.lr_plan is not None:
            checkpoint["lr_plan"] = self.lr_plan.state
        checkpoint[CURVE_LOGS] = self.history.logs(self._trainer)
        if self.backbone_frozen_for_good and rebuildable(self.hparams):  # named weights, a file, a seeded init
            strip_backbone(checkpoint, backbone_identity(self.hparams.backbone, self.weights_sha256, self.preprocess))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_resumed(checkpoint, self.class_names)
        self.weights_id = checkpoint.get("weights_id", self.weights_id)
        self._saved_lr_plan = checkpoint.get("lr_plan") or legacy_lr_plan(checkpoint)
        self.history.resume(checkpoint, self._trainer)
        # A head-only checkpoint's backbone: this model's when it is the one the checkpoint was trained
        # on (a resumed head run), else the one its identity rebuilds (a fine-tune run resumed from it).
        restore_backbone(checkpoint, self.backbone, lambda: self.weights_sha256)

    def on_train_start(self) -> None:
        saved, self._saved_lr_plan = self._saved_lr_plan, None
        replanned = self.lr_plan.resume(saved, self.trainer) if self.lr_plan is not None else None
        if replanned and self.trainer.is_global_zero:
            log.info(replanned)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if self.freeze_backbone:
            # requires_grad=False alone lets BatchNorm stats move and dropout drop features: run it in eval mode.
            stages = self.finetune_stages if mode and self.finetune_active else []
            set_frozen_modes(self.backbone, stages, train_norm=self.finetune.bn == "train")
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning restores per-module train/eval flags around validation without calling train(),
        # so enforce the BatchNorm policy here as well (it also changes at the fine-tune epoch).
        self.train(True)
        if self.finetune_active and not self._finetune_announced:
            self._finetune_announced = True
            if self.trainer.is_global_zero:
                lrs = {g.get("name"): g["lr"] for g in self.trainer.optimizers[0].param_groups}
                log.info(phase_message(self.finetune, self.current_epoch, lrs))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, (B, width) (2048 for resnet50), from preprocessed images."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.training and self.finetune_start is not None and not self.finetune_active and torch.is_grad_enabled():
            # Head-only epochs of a fine-tune run: the stages to unfreeze already require grad (for DDP),
            # but must not get any yet; no_grad also skips their backward. (Eval, export: never here.)
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        features = holds_features(x)  # cached backbone features, else preprocessed images
        if features and self.finetune_active:
            raise FmnistError(
                f"cached backbone features reached the model in its fine-tune phase (epoch {self.current_epoch + 1}); "
                "they are stale once the backbone trains: turn the feature cache off for fine-tune runs"
            )
        return self.head(x.to(self.head[0].weight.dtype)) if features else self(x)

    def _step(self, batch, stage: str, batch_idx: int = 0) -> torch.Tensor:
        x, y = batch
        logits = self.logits(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        self.metrics.update(stage, logits, y, loss, f"epoch {self.current_epoch + 1}, step {self.global_step}")
        if stage != "train":
            self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=len(y), sync_dist=True)
        elif batch_idx % getattr(self._trainer, "log_every_n_steps", 1) == 0:
            # self.log costs as much as a head step on cached features, and loggers write every
            # log_every_n_steps only. Not on a GPU's progress bar: it reads back (syncs) at every refresh.
            self.log("train/loss_step", loss, prog_bar=loss.device.type != "cuda", batch_size=len(y))
        return loss

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.metrics.train_epoch(self.current_epoch), prog_bar=True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", batch_idx)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.metrics.compute("val"), prog_bar=True)
        if not self.trainer.sanity_checking:
            # Stop before ModelCheckpoint saves (after this hook): a diverged model never becomes last.ckpt.
            check_finite_parameters(self, self.current_epoch)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.metrics.compute("test"))

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self.logits(batch[0] if isinstance(batch, (list, tuple)) else batch).float().softmax(-1)

    def configure_optimizers(self) -> Any:
        skip_nvml_retries_without_a_driver()  # the optimizer checks for CUDA at every step
        head, stages = self.head.parameters(), [p for stage in self.finetune_stages for p in stage.parameters()]
        trainable = [p for p in self.parameters() if p.requires_grad]
        config, self.lr_plan = configure_model_optimization(
            head,
            stages,
            trainable,
            self.hparams,
            self.finetune,
            self.trainer.max_epochs,
            lambda: self.trainer.estimated_stepping_batches,
        )
        return config


def rebuild_from_checkpoint(
    cls: type[TransferClassifier], path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> TransferClassifier:
    """`TransferClassifier.from_checkpoint`; a head-only checkpoint's backbone is rebuilt from the weights it
    names, then checked against the sha256 it recorded."""
    ckpt = read_checkpoint(path, map_location=map_location)
    head_only = "backbone_identity" in ckpt
    try:
        model = cls(**with_legacy_identity(ckpt["hyper_parameters"]), load_weights=head_only)
    except FmnistError as e:
        if not head_only:
            raise
        raise FmnistError(f"checkpoint {path} holds the head only; its backbone cannot be rebuilt: {e}") from e
    if head_only:
        fill_rebuilt_backbone(ckpt, model.backbone, f"checkpoint {path}")
    model.load_state_dict(ckpt["state_dict"])
    model.weights_id = ckpt.get("weights_id", model.weights_id)
    model.history = FitHistory(ckpt.get(CURVE_LOGS))
    return model.eval()
