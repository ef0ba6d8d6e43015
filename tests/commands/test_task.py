"""The task wrapper every command runs in: exit codes, the one-line error, tracebacks, noise off at start."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmnist_tl.core import FmnistError
from fmnist_tl.runtime import task_wrapper
from tests.helpers import REPO


def _run(error: BaseException, capsys, **kwargs) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as exit_info, task_wrapper(**kwargs):
        raise error
    return exit_info.value.code, capsys.readouterr().err


def _raised_while_handling(cause: BaseException, error: BaseException) -> BaseException:
    try:
        raise cause
    except BaseException:
        try:
            raise error
        except BaseException as e:
            return e


@pytest.fixture(autouse=True)
def _user_full_error_unset(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@pytest.mark.parametrize(
    "error, code, line",
    [
        (FmnistError("data.batch_size=0 must be an integer >= 1"), 2, "data.batch_size=0 must be an integer >= 1"),
        (KeyboardInterrupt(), 130, "interrupted by Ctrl-C"),
        # Lightning's own exit after it handled Ctrl-C mid-fit: the Ctrl-C is named, not SystemExit.
        (_raised_while_handling(KeyboardInterrupt(), SystemExit(1)), 130, "interrupted by Ctrl-C"),
        (SIGTERMException(), 143, "interrupted by SIGTERM"),
    ],
    ids=["refused", "ctrl-c", "ctrl-c-mid-fit", "sigterm"],
)
def test_a_stop_is_one_error_line_and_its_exit_code(error, code, line, capsys):
    assert _run(error, capsys) == (code, f"error: {line}\n")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="a bug"), task_wrapper():
        raise RuntimeError("a bug")


@pytest.mark.parametrize("code", [0, 2, None])
def test_an_exit_of_the_body_itself_passes_through(code):
    """argparse's --help and usage errors exit by themselves: not an interruption."""
    with pytest.raises(SystemExit) as exit_info, task_wrapper():
        raise SystemExit(code)
    assert exit_info.value.code == code


def test_the_users_hydra_full_error_keeps_the_traceback(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FmnistError, match="refused"), task_wrapper():
        raise FmnistError("refused")


def test_an_exception_chain_that_loops_is_still_classified(capsys):
    """A chain can lead back to itself (an error raised from its own cause): the check must end."""
    error = FmnistError("cannot get weights")
    cause = OSError("connection refused")
    error.__cause__, cause.__context__ = cause, error
    assert _run(error, capsys) == (2, "error: cannot get weights\n")


def test_on_stop_rewords_a_stop_or_lets_the_command_go_on(capsys):
    assert _run(KeyboardInterrupt(), capsys, on_stop=lambda s: s.with_line(f"training {s.line}; resume")) == (
        130,
        "error: training interrupted by Ctrl-C; resume\n",
    )
    went_on = []
    with task_wrapper(on_stop=lambda s: went_on.append(s.status)):
        raise FmnistError("a failed sweep job")
    assert went_on == ["failed"]


def test_no_mutable_module_state_and_no_second_env_variable():
    source = (REPO / "fmnist_tl" / "runtime" / "task.py").read_text()
    assert "TASK_STARTED" not in source and "FMNIST_TL_HYDRA_FULL_ERROR" not in source
    module = sys.modules[task_wrapper.__module__]
    assert not [k for k, v in vars(module).items() if not k.startswith("__") and isinstance(v, (list, dict, set))]


_FILTERS_AFTER = """
import warnings, fmnist_tl.train, fmnist_tl.evaluate, fmnist_tl.training.model
def ours():
    return [f for f in warnings.filters if f[1] is not None and "eval mode at the start" in f[1].pattern]
before = len(ours())
from fmnist_tl.runtime import task_wrapper
with task_wrapper():
    pass
print(before, len(ours()))
"""


@pytest.mark.slow
def test_warning_filters_are_set_when_a_command_runs_not_at_import():
    out = subprocess.run(
        [sys.executable, "-c", _FILTERS_AFTER], capture_output=True, text=True, cwd=REPO, timeout=300, check=True
    )
    assert out.stdout.split() == ["0", "1"]


def test_task_start_silences_the_known_warnings():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with task_wrapper():
            warnings.warn("Found 68 module(s) in eval mode at the start of training.", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]
