"""Where the configs live, composing them outside a Hydra run, and Hydra's errors as one line."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
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
            raise FmnistError(hydra_error_line(e, config_name)) from e


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


def hydra_error_line(e: BaseException, config_name: str) -> str:
    """One line for an error Hydra or OmegaConf raised while composing conf/<config_name>.yaml."""
    message, cause = str(e), e.__cause__
    first = message.strip().splitlines()[0] if message.strip() else type(e).__name__
    if isinstance(e, MissingConfigException):
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
        options = re.findall(r"^\t(\S+)$", message.split("Config search path:")[0], flags=re.M)
        options = [o for o in options if o != "schema"]
        if found:
            group, name = found.groups()
            return f"{group}={name}: no such option in {group}; choose one of {', '.join(options) or '(none)'}"
        return first
    if isinstance(e, OverrideParseException):
        detail = next((line for line in message.splitlines()[1:] if line and not line.startswith("See ")), "")
        return f"{first}{f' ({detail})' if detail else ''}; see https://hydra.cc/docs/advanced/override_grammar/basic/"
    override = re.search(r"(?:Could not override|Error merging override) '?([^'\s]+)'?", message)
    key = override.group(1).split("=", 1)[0].lstrip("+~") if override else ""
    if key in schemas.MOVED_KEYS:  # Hydra's message names the key in one line and the whole override in another
        given = re.search(rf"{re.escape(key)}=(\S+)", message)
        return schemas.unknown_key_message(key, [], value=given.group(1) if given else None, entry=config_name)
    if key.split(".")[0] == "model" and config_name != "train":
        return (
            f"{key}: {config_name} takes the model from the checkpoint (ckpt_path), so it has no model.* "
            "settings; drop that override"
        )
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        parts = key.split(".")
        for depth in range(len(parts)):  # name the first unknown part, with its close matches
            known = _known_keys(config_name, ".".join(parts[:depth]))
            if known and parts[depth] not in known:
                # An open node (the trainer's) takes new keys with +; a schema's never does.
                return schemas.unknown_key_message(".".join(parts[: depth + 1]), known, can_add=parts[0] == "trainer")
        return schemas.unknown_key_message(key, [], can_add=True)
    if isinstance(cause, OmegaConfBaseException) and override:
        what = str(cause).strip().splitlines()[0]
        return f"{override.group(1)}: {what} (see conf/{config_name}.yaml and its groups)"
    exists = re.search(r"An item is already at '([^']+)'", message)
    if exists:
        return f"+{exists.group(1)}: the key exists already; drop the + (write {exists.group(1)}=...)"
    return first
