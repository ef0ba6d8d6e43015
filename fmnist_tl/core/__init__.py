"""The bottom layer: the user-facing error, atomic writes and hashes, machine identity, progress bars."""

from fmnist_tl.core.errors import FmnistError, require_modules
from fmnist_tl.core.files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    module_sha256,
    remove_stale_temp_files,
    replace_between,
    sha256_file,
    tensors_sha256,
)
from fmnist_tl.core.machine import (
    cpu_flags,
    cpu_model,
    cuda_has_bf16,
    machine_name,
    require_bf16,
    skip_nvml_retries_without_a_driver,
)
from fmnist_tl.core.progress import EpochProgressBar, missing_progress_bar, progress_bar

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cpu_flags",
    "cpu_model",
    "cuda_has_bf16",
    "EpochProgressBar",
    "FmnistError",
    "machine_name",
    "missing_progress_bar",
    "module_sha256",
    "progress_bar",
    "remove_stale_temp_files",
    "replace_between",
    "require_bf16",
    "require_modules",
    "sha256_file",
    "skip_nvml_retries_without_a_driver",
    "tensors_sha256",
]
