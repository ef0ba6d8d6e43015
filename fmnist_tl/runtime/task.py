"""The task wrapper every command runs in: exit codes, the one-line `error:`, Hydra's errors."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf.errors import OmegaConfBaseException

from fmnist_tl.config import hydra_error_line
from fmnist_tl.core import FmnistError
from fmnist_tl.training import silence_known_noise

EXIT_REFUSED, EXIT_CTRL_C, EXIT_SIGTERM, EXIT_BUG = 2, 130, 143, 1

# Hydra restores the user's HYDRA_FULL_ERROR inside each job (hydra.job.env_set; run_hydra_cli).
_ENV_SET = "hydra.job.env_set.HYDRA_FULL_ERROR"

# Marks an exception that left a running task: it is the task's own, never a config Hydra refused.
_FROM_TASK = "_fmnist_tl_from_task"


@dataclass(frozen=True)
class Stop:
    """Why a command stopped early: its status (as metrics.json records it), exit code and one line.

    status is "failed" or "interrupted"; a sweep's pruned trial (optuna.TrialPruned raised in fit)
    is the place for a third, "pruned", which the sweeper reports to Optuna and which is no error.
    """

    status: str
    code: int
    line: str
    bug: bool = False  # not a refusal we wrote: its traceback is what helps

    def with_line(self, line: str) -> Stop:
        return replace(self, line=line)


def interruption(e: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM behind an exception, also when Lightning wraps it (its SystemExit)."""
    seen: BaseException | None = e
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:  # a chain can loop back on itself
        visited.add(id(seen))
        # (Lightning ends a fit stopped by Ctrl-C with sys.exit(1), raised while handling it.)
        if isinstance(seen, (KeyboardInterrupt, SIGTERMException)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def stop_of(e: BaseException) -> Stop | None:
    """The Stop an exception means; None for what is not a stop (a plain SystemExit, GeneratorExit)."""
    if isinstance(e, SystemExit) and e.code in (EXIT_REFUSED, EXIT_CTRL_C, EXIT_SIGTERM):
        return None  # already reported by who raised it (the sweeper's advice after Ctrl-C), with its code
    signal = interruption(e)
    if signal is not None:
        sigterm = isinstance(signal, SIGTERMException)
        return Stop(
            "interrupted",
            EXIT_SIGTERM if sigterm else EXIT_CTRL_C,
            f"interrupted by {'SIGTERM' if sigterm else 'Ctrl-C'}",
        )
    if isinstance(e, FmnistError):
        return Stop("failed", EXIT_REFUSED, str(e))
    if isinstance(e, Exception):
        message = f"{type(e).__name__}: {e}".strip()
        return Stop("failed", EXIT_BUG, message.splitlines()[0], bug=True)
    return None


def full_error_wanted() -> bool:
    """Whether the user asked for full tracebacks: their HYDRA_FULL_ERROR=1.

    Inside a Hydra job os.environ holds the user's value again (hydra.job.env_set); outside one (a
    sweeper's own loop) the composed Hydra config records it.
    """
    if HydraConfig.initialized():
        value = HydraConfig.get().job.env_set.get("HYDRA_FULL_ERROR")
        if value is not None:
            return str(value) == "1"
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def remove_untouched_run_dir() -> None:
    """Remove the run dir Hydra made for a single run that wrote nothing into it.

    Hydra creates the run dir, its .hydra/ and the (empty) log file before the task starts; a
    config refused before anything is built would otherwise leave that shell behind.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name != ".hydra" and not (p.is_file() and p.stat().st_size == 0):
            return
    shutil.rmtree(run_dir, ignore_errors=True)


@contextlib.contextmanager
def task_wrapper(hydra_run: bool = False, on_stop: Callable[[Stop], Stop | None] | None = None) -> Iterator[None]:
    """Run a command's body: a refusal is `error: <line>` and exit 2, Ctrl-C 130, SIGTERM 143.

    A bug keeps its traceback (exit 1), as does everything under the user's HYDRA_FULL_ERROR=1.
    Lightning's and torch's known noise is silenced when the body starts. With `hydra_run`, the run
    dir a refused config left empty is removed.

    Args:
        on_stop: told of every stop first; returns the Stop to report (its line may say more, such
            as where the checkpoint is), or None when the command handled it and goes on (a failed
            sweep job is recorded and the sweep continues).
    """
    silence_known_noise()
    try:
        yield
    except BaseException as e:
        stop = stop_of(e)
        if stop is None:
            raise
        if on_stop is not None:
            stop = on_stop(stop)
            if stop is None:
                return
        if hydra_run and stop.code == EXIT_REFUSED:
            remove_untouched_run_dir()
        if stop.bug or full_error_wanted():
            setattr(e, _FROM_TASK, True)
            raise
        print(f"error: {stop.line}", file=sys.stderr)
        sys.exit(stop.code)


def run_hydra_cli(main: Callable[[], Any], config_name: str) -> None:
    """Run a @hydra.main entry point, with Hydra's composition errors as one `error:` line, exit 2.

    HYDRA_FULL_ERROR=1 makes Hydra raise its errors instead of printing its multi-line report;
    hydra.job.env_set gives each job the user's own value back, which task_wrapper follows. An error
    that left a running task is the task's (a traceback), never reported as a config error.
    """
    user_value = os.environ.get("HYDRA_FULL_ERROR", "0")
    if not any(arg.lstrip("+").startswith(f"{_ENV_SET}=") for arg in sys.argv[1:]):  # a DDP rank re-runs argv
        sys.argv.append(f"++{_ENV_SET}={user_value}")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        if user_value == "1" or getattr(e, _FROM_TASK, False):
            raise
        given = [arg for arg in sys.argv[1:] if not arg.startswith("-")]  # not flags such as -m
        print(f"error: {hydra_error_line(e, config_name, given)}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
