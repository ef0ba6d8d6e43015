"""The config schemas (what every key takes) and composing conf/ outside a Hydra run."""

from fmnist_tl.config.compose import CONFIG_PATH, compose_config, hydra_error_line
from fmnist_tl.config.data_schemas import FashionMNISTDataConfig, ImageFolderDataConfig, fraction_or_count
from fmnist_tl.config.schemas import (
    ODD_BATCH,
    FeaturesConfig,
    FinetuneConfig,
    at_least,
    check_config,
    in_range,
    one_of,
    parse,
    to_container,
)

__all__ = [
    "check_config",
    "at_least",
    "compose_config",
    "CONFIG_PATH",
    "FashionMNISTDataConfig",
    "FeaturesConfig",
    "hydra_error_line",
    "ImageFolderDataConfig",
    "FinetuneConfig",
    "fraction_or_count",
    "in_range",
    "ODD_BATCH",
    "one_of",
    "parse",
    "to_container",
]
