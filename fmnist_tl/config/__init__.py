"""The config schemas (what every key takes) and composing conf/ outside a Hydra run."""

from fmnist_tl.config.compose import CONFIG_PATH, compose_config, hydra_error_line
from fmnist_tl.config.schemas import (
    ODD_BATCH,
    FeaturesConfig,
    FinetuneConfig,
    at_least,
    check_config,
    fraction_or_count,
    in_range,
    parse,
    to_container,
)

__all__ = [
    "check_config",
    "at_least",
    "compose_config",
    "CONFIG_PATH",
    "FeaturesConfig",
    "hydra_error_line",
    "FinetuneConfig",
    "fraction_or_count",
    "in_range",
    "ODD_BATCH",
    "parse",
    "to_container",
]
