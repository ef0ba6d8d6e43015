"""Small shared helpers: the user-facing error type, atomic writes, file and tensor hashes, machine identity."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class FmnistError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits non-zero."""


def to_container(x: Any) -> Any:
    """Hydra hands DictConfigs; checkpoints must hold plain containers to load with weights_only=True."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def require_modules(what: str, extra: str, *modules: str) -> None:
    """Refuse `what` before anything is built when an optional dependency is missing, naming the fix."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FmnistError(f"{what} needs {', '.join(missing)}, not installed: pip install 'fmnist_tl[{extra}]'")


def check_logger_dependencies(loggers: Any) -> None:
    """The `logger` group's optional packages (logger=tensorboard, logger=many_loggers)."""
    for name, conf in (loggers or {}).items():
        target = str(conf.get("_target_", "")) if conf else ""
        # Lightning's TensorBoardLogger also runs on tensorboardX alone.
        if target.endswith(".TensorBoardLogger") and importlib.util.find_spec("tensorboardX") is None:
            require_modules(f"logger.{name}", "tensorboard", "tensorboard")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target's directory; on success it replaces `path` in one step.

    A crash (or ENOSPC) mid-write leaves the previous file untouched and removes the temp file,
    so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise FmnistError(f"{path}: no space left on device; free space and rerun (old file kept)") from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_between(text: str, start: str, end: str, body: str) -> str | None:
    """`text` with what lies between the markers `start` and `end` replaced by `body`; None without both."""
    before, found_start, rest = text.partition(start)
    _, found_end, after = rest.partition(end)
    return f"{before}{start}{body}{end}{after}" if found_start and found_end else None


def remove_stale_temp_files(directory: str | os.PathLike) -> None:
    """Delete temp files an earlier process left behind when it was killed mid-write."""
    directory = Path(directory)
    if directory.is_dir():
        for p in directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, independent of device and memory layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def module_sha256(module: torch.nn.Module) -> str:
    """Identity of a module's weights (parameters and buffers, e.g. BatchNorm running stats).

    Hashing the tensors themselves covers every source alike: torchvision weights, a
    weights file, and a random init (seeded, so the same seed gives the same identity).
    """
    return tensors_sha256(module.state_dict())


def _cpuinfo(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo, or None where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (e.g. 'AMD EPYC 9R14'), else platform's guess."""
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The CPU's feature flags (for the record and the probe's key: speed choices are measured, never read
    from flags)."""
    return (_cpuinfo("flags") or "").split()


def machine_name(device: torch.device | str) -> str:
    """What a speed measurement on `device` depends on: the GPU's name, or the CPU model and flags."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    # Virtual machines report a bare "AMD EPYC" or "Intel Xeon Processor" for generations of
    # very different speed (AVX2 only, or AVX512-BF16): timings taken on one must not be reused
    # on the other through a shared cache. The flags tell them apart; nothing is chosen from them.
    flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:10]
    return f"cpu:{cpu_model()} flags:{flags}"


def remove_untouched_run_dir() -> None:
    """Remove the run dir Hydra made for a single run that wrote nothing into it.

    Hydra creates the run dir, its .hydra/ and the (empty) log file before the task starts; a
    config refused before anything is built would otherwise leave that shell behind.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name != ".hydra" and not (p.is_file() and p.stat().st_size == 0):
            return
    shutil.rmtree(run_dir, ignore_errors=True)


def full_error_wanted() -> bool:
    """Whether the user asked for full tracebacks (HYDRA_FULL_ERROR=1), as they set it.

    The Hydra CLIs set HYDRA_FULL_ERROR=1 themselves to receive Hydra's errors (runtime.run_hydra_cli)
    and keep the user's own setting in USER_FULL_ERROR_ENV, which child processes inherit.
    """
    return os.environ.get(USER_FULL_ERROR_ENV, os.environ.get("HYDRA_FULL_ERROR")) == "1"


USER_FULL_ERROR_ENV = "FMNIST_TL_HYDRA_FULL_ERROR"
# Set once a Hydra task function runs: an error after that is the task's, never a config error.
TASK_STARTED = False


@contextlib.contextmanager
def exit_on_user_error(hydra_run: bool = False) -> Iterator[None]:
    """For CLI entry points: a FmnistError becomes `error: <msg>` on stderr and exit code 2.

    Ctrl-C exits 130. HYDRA_FULL_ERROR=1 keeps the full traceback instead. With `hydra_run` (a
    Hydra entry point), the run dir a refused config left empty is removed.
    """
    global TASK_STARTED
    TASK_STARTED = TASK_STARTED or hydra_run
    try:
        yield
    except (FmnistError, KeyboardInterrupt) as e:
        if hydra_run and isinstance(e, FmnistError):
            remove_untouched_run_dir()
        if full_error_wanted():
            raise
        message = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)


NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"


def skip_nvml_retries_without_a_driver() -> bool:
    """Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import, so that checking for CUDA does not
    initialise it in a process that will fork DDP workers. Where NVML cannot load (no NVIDIA driver),
    torch then retries loading it at every `torch.cuda.is_available()`, and Adam/AdamW ask at every
    step: a head epoch of small steps pays for it. Without a driver CUDA can never initialise, so
    there is no fork to protect, and torch's plain check (a cheap call) is used instead.
    TransferClassifier calls this when it makes its optimizer. True when it switched the check."""
    if os.environ.get(NVML_CHECK_ENV) != "1":
        return False
    import ctypes

    try:  # torch's own probe (torch.cuda._raw_device_count_nvml) loads this name
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        os.environ[NVML_CHECK_ENV] = "0"
        return True
    return False
