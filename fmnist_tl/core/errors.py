"""The user-facing error type, and the one-line hint for a missing optional dependency."""

from __future__ import annotations

import importlib.util


class FmnistError(Exception):
    """An error caused by user input; the CLI prints its message as one line and exits non-zero."""


def require_modules(what: str, extra: str, *modules: str) -> None:
    """Refuse `what` before anything is built when an optional dependency is missing, naming the fix."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FmnistError(f"{what} needs {', '.join(missing)}, not installed: pip install 'fmnist_tl[{extra}]'")
