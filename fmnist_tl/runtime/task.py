"""The task wrapper every command runs in: exit codes, the one-line `error:`, Hydra's errors."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from fmnist_tl.config import hydra_error_line
from fmnist_tl.core import FmnistError

log = logging.getLogger(__name__)


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


# The frozen backbone is in eval mode on purpose (BatchNorm stats must not move).
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


# Mixed precision keeps fp32 weights, so the summary's 32-bit size estimate it warns about is right.
warnings.filterwarnings("ignore", message=r"Precision \S+-mixed is not supported by the model summary")


class _DropAdvertTips(logging.Filter):
    """Lightning logs a tip to install litlogger/litmodels (a cloud service) on every run: not ours to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("💡 Tip") and ("litlogger" in message or "litmodels" in message))


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertTips())


def run_hydra_cli(main: Callable[[], Any], config_name: str) -> None:
    """Run a @hydra.main entry point, with Hydra's composition errors as one `error:` line, exit 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise instead of printing its multi-line report; the user's own
    setting is kept in USER_FULL_ERROR_ENV, and with it set to 1 the full trace is shown as usual.
    """
    os.environ.setdefault(USER_FULL_ERROR_ENV, os.environ.get("HYDRA_FULL_ERROR", "0"))
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        if full_error_wanted() or TASK_STARTED:
            raise
        print(f"error: {hydra_error_line(e, config_name)}", file=sys.stderr)
        sys.exit(2)
