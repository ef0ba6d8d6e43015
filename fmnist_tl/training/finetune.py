"""model.finetune, parsed and checked: when the fine-tune phase starts and what it unfreezes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fmnist_tl.backbones import resolve_stages
from fmnist_tl.config import FinetuneConfig, parse, to_container
from fmnist_tl.core import FmnistError


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """model.finetune, checked (see conf/model/resnet50.yaml for what each key means)."""

    start_epoch: int | None = None
    init_from: str | None = None
    # Stage names (backbones.stage_names), input-to-output order, no duplicates, or ["all"]: the same
    # list on every rank and in every checkpoint. `last_K` is spelled out when parsed.
    unfreeze: list[str] = dataclasses.field(default_factory=lambda: ["last_1"])
    backbone_lr_factor: float = 0.1
    bn: str = "frozen"
    lr: float | None = None
    warmup_epochs: int = 0
    schedule: str = "cosine"

    @property
    def first_epoch(self) -> int | None:
        """First epoch that trains the backbone, or None for a head-only run.

        `start_epoch` when set; a run that starts from `init_from` fine-tunes from epoch 0. Backbone
        features only stay valid (cacheable) while this is None or not yet reached.
        """
        if self.start_epoch is not None:
            return self.start_epoch
        return 0 if self.init_from else None

    def phase_message(self, epoch: int, lrs: Mapping[str | None, float]) -> str:
        """The log line of the first fine-tune epoch this run trains (`epoch`, 0-based, as Lightning counts:
        later than first_epoch in a resumed run); `lrs` by param group name (head, backbone).

        Epochs are named as the progress bar and curves.png count them, from 1; the config key keeps its
        0-based value beside it.
        """
        nan = float("nan")
        first = self.first_epoch or 0
        resumed = f", resumed at epoch {epoch + 1}" if epoch != first else ""
        return (
            f"Fine-tune phase from epoch {first + 1} (model.finetune.start_epoch={first}{resumed}): training backbone "
            f"{'+'.join(self.unfreeze)} at lr {lrs.get('backbone', nan):.3g} (head {lrs.get('head', nan):.3g}), "
            f"BatchNorm {self.bn}; backbone features change from here on, so no cached features are used"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain containers, as the model's hyper-parameters (and so every checkpoint) hold them."""
        return dataclasses.asdict(self)


def finetune_options(finetune: Mapping[str, Any] | FinetuneOptions | None, backbone: str) -> FinetuneOptions:
    """model.finetune parsed and checked once (schemas.FinetuneConfig); `unfreeze` spelled out as
    `backbone`'s stage names."""
    if isinstance(finetune, FinetuneOptions):
        return finetune
    given = {**FinetuneOptions().as_dict(), **(to_container(finetune) or {})}
    ft = OmegaConf.to_container(parse(FinetuneConfig, given, "model.finetune.", "conf/model/resnet50.yaml"))
    names = [ft["unfreeze"]] if isinstance(ft["unfreeze"], str) else ft["unfreeze"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FmnistError(
            f"model.finetune.unfreeze={ft['unfreeze']!r} must be a list of {backbone}'s stage names, "
            "last_K (its K top stages) or all"
        )
    return FinetuneOptions(**{**ft, "unfreeze": resolve_stages(backbone, names)})


def check_finetune(
    ft: FinetuneOptions, freeze_backbone: bool, max_epochs: int | None, check_files: bool = True
) -> None:
    """Reject a fine-tune config that cannot run as asked, before anything is built."""
    start = ft.first_epoch
    if start is None:
        return
    if not freeze_backbone:
        raise FmnistError(
            "model.finetune needs model.freeze_backbone=true (false trains the whole backbone from epoch 0); "
            "drop one of the two"
        )
    if max_epochs is not None and start >= max_epochs:
        raise FmnistError(
            f"model.finetune.start_epoch={start} leaves no fine-tune epoch with trainer.max_epochs={max_epochs}; "
            f"raise trainer.max_epochs above {start} (fine-tuning runs from epoch {start + 1} to epoch max_epochs)"
        )
    if check_files and ft.init_from is not None and not Path(ft.init_from).is_file():
        raise FmnistError(f"model.finetune.init_from={ft.init_from} does not exist; pass a checkpoint from a head run")
