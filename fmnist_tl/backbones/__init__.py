"""Any torchvision classifier by name as a headless backbone, and its weights loaded safely."""

from fmnist_tl.backbones.registry import feature_dim, preprocessing, resolve_stages, set_frozen_modes
from fmnist_tl.backbones.weights import (
    backbone_identity,
    build_backbone,
    build_backbone_of,
    check_backbone,
    fetch_torchvision_weights,
    fill_rebuilt_backbone,
    init_from_state,
    load_state_dict_file,
    read_checkpoint,
    rebuildable,
    restore_backbone,
    strip_backbone,
    weights_memo_key,
    weights_sha256,
)

__all__ = [
    "backbone_identity",
    "build_backbone",
    "build_backbone_of",
    "check_backbone",
    "feature_dim",
    "fetch_torchvision_weights",
    "fill_rebuilt_backbone",
    "init_from_state",
    "load_state_dict_file",
    "preprocessing",
    "read_checkpoint",
    "rebuildable",
    "resolve_stages",
    "restore_backbone",
    "set_frozen_modes",
    "strip_backbone",
    "weights_memo_key",
    "weights_sha256",
]
