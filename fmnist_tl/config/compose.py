"""Where the configs live, composing them outside a Hydra run, and Hydra's errors as one line."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fmnist_tl.config import schemas
from fmnist_tl.core import FmnistError

log = logging.getLogger(__name__)


# The configs ship inside the package (pyproject.toml maps conf/ to fmnist_tl.conf), so a wheel
# or `pip install .` finds them as well as an editable install does, from any directory.
CONFIG_MODULE = "fmnist_tl.conf"


_CHECKOUT_CONF = Path(__file__).resolve().parents[2] / "conf"


# A source tree imported without an install that maps conf/ (a clone on sys.path, or a checkout
# that shadows a non-editable install when run from its root) has no fmnist_tl.conf: read its conf/.
CONFIG_PATH = (
    str(_CHECKOUT_CONF)
    if importlib.util.find_spec(CONFIG_MODULE) is None and _CHECKOUT_CONF.is_dir()
    else f"pkg://{CONFIG_MODULE}"
)


def compose_config(config_name: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """conf/<config_name>.yaml with overrides, composed outside a Hydra run from where the CLIs read it.

    Hydra's own errors (bad override, unknown key, wrong type) come out as one-line FmnistErrors.
    """
    GlobalHydra.instance().clear()
    if CONFIG_PATH.startswith("pkg://"):
        context = initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3")
    with context:
        try:
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
        except (HydraException, OmegaConfBaseException) as e:
            raise FmnistError(hydra_error_line(e, config_name, overrides)) from e


def _known_keys(config_name: str, parent: str) -> list[str]:
    """The keys a schema declares at `parent` (a dotted path), for close-match hints."""
    node: Any = schemas.ENTRIES.get(config_name)
    for part in [p for p in parent.split(".") if p]:
        if part == "trainer":
            return schemas.trainer_parameters()
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            return []
        node = fields[part].type
        node = getattr(schemas, node, None) if isinstance(node, str) else node
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _given(overrides: Sequence[str], key: str) -> tuple[str, str | None]:
    """The override of `key` or of a key under it, as the user wrote it, and its value (None: not given)."""
    for override in overrides:
        name, eq, value = override.partition("=")
        name = name.lstrip("+~")
        if name == key or name.startswith(f"{key}."):
            return override, value if eq else None
    return key, None


def _unknown_key(cause: OmegaConfBaseException, config_name: str, overrides: Sequence[str]) -> str:
    """A key the schemas do not have: where it moved, why an entry has none, or its close matches."""
    override, value = _given(overrides, cause.full_key)
    key = override.partition("=")[0].lstrip("+~")
    if cause.full_key in schemas.MOVED_KEYS:
        return schemas.unknown_key_message(cause.full_key, [], value=value, entry=config_name)
    if key.split(".")[0] == "model" and config_name != "train":
        return (
            f"{key}: {config_name} takes the model from the checkpoint (ckpt_path), so it has no model.* "
            "settings; drop that override"
        )
    parts = cause.full_key.split(".")
    for depth in range(len(parts)):  # name the first unknown part, with its close matches
        known = _known_keys(config_name, ".".join(parts[:depth]))
        if known and parts[depth] not in known:
            # An open node (the trainer's) takes new keys with +; a schema's never does.
            return schemas.unknown_key_message(".".join(parts[: depth + 1]), known, can_add=parts[0] == "trainer")
    return schemas.unknown_key_message(cause.full_key, [], can_add=True)


def _first_line(text: str, default: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else default


def hydra_error_line(e: BaseException, config_name: str, overrides: Sequence[str] = ()) -> str:
    """One line for an error Hydra or OmegaConf raised while composing conf/<config_name>.yaml.

    By the exception's type and fields, never its wording: the error's own first line, with our hint
    where we have one. `overrides` (the command line) names what the user wrote.
    """
    first = _first_line(str(e), type(e).__name__)
    cause = e.__cause__
    if isinstance(e, MissingConfigException):
        if not e.missing_cfg_file or e.options is None:
            return first
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = [o for o in e.options if o != "schema"]  # our schemas, registered in each group
        return f"{group}={name}: no such option in {group}; choose one of {', '.join(options) or '(none)'}"
    if isinstance(e, OverrideParseException):
        detail = (e.message or "").strip().splitlines()[1:2]
        return (
            f"{_first_line(e.message or '', first)}{f' ({detail[0]})' if detail else ''}; "
            "see https://hydra.cc/docs/advanced/override_grammar/basic/"
        )
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return _unknown_key(cause, config_name, overrides)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        override, value = _given(overrides, cause.full_key)
        given = override if value is not None else f"{cause.full_key}={cause.value}"
        return f"{given}: {_first_line(cause.msg or '', first)} (see conf/{config_name}.yaml and its groups)"
    if isinstance(e, ConfigCompositionException) and cause is None:
        added = [o for o in overrides if o.startswith("+") and not o.startswith("++")]
        known = [o for o in added if _is_declared(config_name, o[1:].partition("=")[0])]
        if known:
            key = known[0][1:].partition("=")[0]
            return f"+{key}: the key exists already; drop the + (write {key}=...)"
    return first


def _is_declared(config_name: str, key: str) -> bool:
    *parent, name = key.split(".")
    return name in _known_keys(config_name, ".".join(parent))
