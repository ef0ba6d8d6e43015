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


def finetune_options(finetune: Mapping[str, Any] | FinetuneConfig | None, backbone: str) -> FinetuneConfig:
    """model.finetune checked against its schema, with `unfreeze` spelled out as `backbone`'s stage names.

    Parse it once per job and pass the result on: a FinetuneConfig is returned as it is.
    """
    if isinstance(finetune, FinetuneConfig):
        return finetune
    ft: FinetuneConfig = OmegaConf.to_object(
        parse(FinetuneConfig, to_container(finetune), "model.finetune.", "conf/model/resnet50.yaml")
    )
    names = [ft.unfreeze] if isinstance(ft.unfreeze, str) else ft.unfreeze
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FmnistError(
            f"model.finetune.unfreeze={ft.unfreeze!r} must be a list of {backbone}'s stage names, "
            "last_K (its K top stages) or all"
        )
    return dataclasses.replace(ft, unfreeze=resolve_stages(backbone, names))


def phase_message(ft: FinetuneConfig, epoch: int, lrs: Mapping[str | None, float]) -> str:
    """The log line of the first fine-tune epoch this run trains (`epoch`, 0-based, as Lightning counts:
    later than first_epoch in a resumed run); `lrs` by param group name (head, backbone).

    Epochs are named as the progress bar and curves.png count them, from 1; the config key keeps its
    0-based value beside it.
    """
    nan = float("nan")
    first = ft.first_epoch or 0
    resumed = f", resumed at epoch {epoch + 1}" if epoch != first else ""
    return (
        f"Fine-tune phase from epoch {first + 1} (model.finetune.start_epoch={first}{resumed}): training backbone "
        f"{'+'.join(ft.unfreeze)} at lr {lrs.get('backbone', nan):.3g} (head {lrs.get('head', nan):.3g}), "
        f"BatchNorm {ft.bn}; backbone features change from here on, so no cached features are used"
    )


def check_finetune(ft: FinetuneConfig, freeze_backbone: bool, max_epochs: int | None, check_files: bool = True) -> None:
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
