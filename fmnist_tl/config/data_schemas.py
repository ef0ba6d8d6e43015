"""The `data` group's schemas, one per datamodule, on the keys every one has (schemas.DataConfig).

conf/data/fashion_mnist.yaml starts from `schema`, conf/data/image_folder.yaml from
`image_folder_schema`; `data` in the entry configs is typed DataConfig, so either composes there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fmnist_tl.config.schemas import DataConfig, at_least, checked, one_of
from fmnist_tl.core import FmnistError


@dataclass
class FashionMNISTDataConfig(DataConfig):
    _target_: str = "fmnist_tl.data.FashionMNISTDataModule"
    data_dir: str = MISSING
    mirror_dir: str | None = None
    download: bool = True
    val_size: int = checked(MISSING, at_least(1))
    train_subset: int | None = checked(None, at_least(1, optional=True))
    test_subset: int | None = checked(None, at_least(1, optional=True))
    # null: do not check that split's size (a mirror holding a subset)
    expected_sizes: dict[str, int | None] = field(default_factory=dict)


def fraction_or_count(key: str, value: Any) -> None:
    """A split's size drawn from another: a fraction in (0, 1) or a count >= 1."""
    ok = not isinstance(value, bool) and (
        (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1)
    )
    if not ok:
        raise FmnistError(f"{key}={value!r} must be a fraction in (0, 1) or a count >= 1")


@dataclass
class ImageFolderDataConfig(DataConfig):
    """`data=image_folder`: a folder of labelled images (fmnist_tl.data.ImageFolderDataModule)."""

    _target_: str = "fmnist_tl.data.ImageFolderDataModule"
    root: str = MISSING
    stored_size: int | None = checked(None, at_least(8, optional=True))
    backbone: str | None = None
    weights: str | None = None
    val_size: Any = checked(MISSING, fraction_or_count)
    test_size: Any = checked(MISSING, fraction_or_count)
    on_bad_file: str = checked("error", one_of("error", "skip"))
    cache_dir: str = MISSING
    run_dir: str | None = None
    decode_workers: int | None = checked(None, at_least(1, optional=True))
    progress: bool = True


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(group="data", name="schema", node=FashionMNISTDataConfig)
    cs.store(group="data", name="image_folder_schema", node=ImageFolderDataConfig)


register()
