"""The frozen backbone's features, extracted once by the measured-fastest backend and cached."""

from fmnist_tl.features.cache import feature_cache_for, features_cache_dir
from fmnist_tl.features.candidates import Candidate, cosine_figures
from fmnist_tl.features.extraction import FeatureExtractor, extraction_settings
from fmnist_tl.features.onnx_backend import INT8_VARIANTS, UInt8Backbone, export_onnx, onnxruntime_version, session
from fmnist_tl.features.probe import Planner, measured_trainer_precision

__all__ = [
    "Candidate",
    "cosine_figures",
    "export_onnx",
    "extraction_settings",
    "feature_cache_for",
    "FeatureExtractor",
    "features_cache_dir",
    "INT8_VARIANTS",
    "measured_trainer_precision",
    "onnxruntime_version",
    "Planner",
    "session",
    "UInt8Backbone",
]
