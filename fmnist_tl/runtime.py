"""What every CLI shares: config composition and validation, instantiation, precision and
checkpoint-path resolution. The CLIs (train, evaluate, export) sit on top of this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fmnist_tl import schemas, utils
from fmnist_tl.backbones import preprocessing
from fmnist_tl.extraction import extraction_settings
from fmnist_tl.features import features_cache_dir
from fmnist_tl.probe import measured_trainer_precision
from fmnist_tl.schedule import check_finetune, finetune_options, legacy_lr_plan, schedule_kind
from fmnist_tl.utils import USER_FULL_ERROR_ENV, FmnistError, check_logger_dependencies, full_error_wanted
from fmnist_tl.weights import check_backbone, read_checkpoint

log = logging.getLogger(__name__)
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

# The configs ship inside the package (pyproject.toml maps conf/ to fmnist_tl.conf), so a wheel
# or `pip install .` finds them as well as an editable install does, from any directory.
CONFIG_MODULE = "fmnist_tl.conf"
_CHECKOUT_CONF = Path(__file__).resolve().parent.parent / "conf"
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
        if full_error_wanted() or utils.TASK_STARTED:
            raise
        print(f"error: {hydra_error_line(e, config_name)}", file=sys.stderr)
        sys.exit(2)


def validate_config(cfg: DictConfig) -> None:
    """Reject bad values before anything is built or written, with one line naming the key.

    Keys and types were checked by Hydra while composing (fmnist_tl/schemas.py); here the ranges
    declared next to each field, then what depends on more than one key or on files.
    """
    schemas.check(cfg)
    check_logger_dependencies(cfg.get("logger"))
    m = cfg.model
    check_backbone(m.backbone, m.weights)
    # The preprocessing the weights expect, where the config leaves it null: the run's config.yaml,
    # its metrics and its checkpoints then record the values used.
    m.image_size, m.mean, m.std = preprocessing(m.backbone, m.weights, m.image_size, m.mean, m.std)
    # fast_dev_run runs one batch whatever the epochs, so a fine-tune config is still worth a smoke test.
    epochs = None if cfg.trainer.get("fast_dev_run") else cfg.trainer.get("max_epochs")
    ckpt = cfg.get("ckpt_path")
    # A resumed run takes every weight from its checkpoint, so init_from may be gone by then.
    ft = finetune_options(m.get("finetune"), m.backbone)
    check_finetune(ft, m.get("freeze_backbone", True), epochs, check_files=ckpt is None)
    if m.weights_path is not None and not Path(m.weights_path).is_file():
        raise FmnistError(f"model.weights_path={m.weights_path} does not exist")
    if ckpt not in (None, "last") and not Path(ckpt).is_file():
        raise FmnistError(f"ckpt_path={ckpt} does not exist; pass a .ckpt file or ckpt_path=last")


def check_checkpoint_file(path: str) -> dict[str, Any]:
    """Refuse a checkpoint Lightning could not load safely, before any training starts."""
    return read_checkpoint(path, f"ckpt_path={path}", "pick another checkpoint", mmap=True)


def check_resume_schedule(cfg: DictConfig, path: str, checkpoint: dict[str, Any]) -> None:
    """Refuse a resume whose LR schedule cannot go on from the checkpoint's, before anything is built.

    A resumed run restores the checkpoint's scheduler state, so it must be the same kind of
    schedule. An extended cosine or fine-tune schedule is re-planned (schedule.LRPlan); a one-cycle
    schedule has a warm-up and an end fixed in steps, so it is only resumed as planned.
    """
    saved = checkpoint.get("lr_plan") or legacy_lr_plan(checkpoint)
    if not saved:
        return
    kind = schedule_kind(cfg.model.get("scheduler"), finetune_options(cfg.model.get("finetune"), cfg.model.backbone))
    if saved.get("scheduler") != kind:
        raise FmnistError(
            f"ckpt_path={path} was trained with LR schedule {saved.get('scheduler') or 'constant'}, this config has "
            f"{kind or 'constant'}; resume with the checkpoint's model.scheduler and model.finetune settings"
        )
    planned, wanted = saved.get("max_epochs"), cfg.trainer.get("max_epochs")
    if kind == "OneCycleLR" and wanted is not None and planned != wanted:
        raise FmnistError(
            f"ckpt_path={path} runs a one-cycle LR schedule planned for trainer.max_epochs={planned}, which cannot "
            f"be re-planned to {wanted}; resume with trainer.max_epochs={planned}, or use model/scheduler=cosine "
            "for runs you may extend"
        )


def resolve_precision(trainer_cfg: DictConfig, measure: Callable[[], str] | None = None) -> str:
    """trainer.precision: explicit values are obeyed; auto is bf16-mixed on a CUDA GPU with bf16, and on
    a CPU whatever `measure()` finds faster (the extraction probe's torch fp32 vs bf16), or 32-true
    when the backbone does not run in the trainer (measure=None: features are cached)."""
    precision = str(trainer_cfg.get("precision", "auto"))
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision.startswith("bf16") and on_cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise FmnistError(
            f"trainer.precision={precision}: this GPU ({torch.cuda.get_device_name()}) has no bf16; "
            "use 16-mixed, 32-true or auto"
        )
    if precision != "auto":
        return precision
    if on_cuda:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return measure() if measure is not None else "32-true"


def cpu_precision_probe(cfg: DictConfig, model: Any) -> Callable[[], str]:
    """trainer.precision=auto on a CPU for a run whose backbone runs in the trainer: measured, cached."""

    def measure() -> str:
        settings = extraction_settings(cfg.get("features") or {})
        chosen, rates = measured_trainer_precision(
            features_cache_dir(cfg),
            settings,
            model.backbone,
            model.hparams.get("backbone", "backbone"),
            model.preprocess,
        )
        log.info(
            "trainer.precision=auto: %s (measured here: torch fp32 %.1f img/s, bf16 %.1f img/s)",
            chosen,
            rates["torch:32"],
            rates["torch:bf16"],
        )
        return chosen

    return measure


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """`last` means the last checkpoint (checkpoints/last*.ckpt) of an earlier run of this task that
    trained furthest: the highest global step recorded in it, then the most recently written.

    Not file times or names alone: a copied run folder has new file times, and an older Lightning
    run may have left a stale last.ckpt next to a newer last-v1.ckpt. Exception checkpoints
    (on_exception.ckpt, written after a crash or NaN) are never picked.
    """
    if cfg.ckpt_path != "last":
        if cfg.ckpt_path is not None:
            check_checkpoint_file(cfg.ckpt_path)
        return cfg.ckpt_path
    root = Path(cfg.paths.log_dir) / cfg.task_name
    here = Path(cfg.paths.output_dir).resolve()
    found = [p for p in root.glob("**/checkpoints/last*.ckpt") if here not in p.resolve().parents]
    if not found:
        raise FmnistError(f"ckpt_path=last: no checkpoints/last.ckpt under {root}; pass ckpt_path=PATH instead")
    steps: dict[Path, int] = {}
    for path in found:
        try:
            steps[path] = int(check_checkpoint_file(str(path)).get("global_step", -1))
        except FmnistError as e:
            log.warning("ckpt_path=last: skipping %s", e)
    if not steps:
        raise FmnistError(f"ckpt_path=last: no readable checkpoints/last.ckpt under {root}; pass ckpt_path=PATH")
    chosen = max(steps, key=lambda p: (steps[p], p.stat().st_mtime))
    log.info("Resuming from %s (global step %d)", chosen, steps[chosen])
    return str(chosen)


def finetune_trainer_overrides(cfg: DictConfig) -> dict[str, Any]:
    """DDP for a run with head-only epochs before its fine-tune phase.

    The stages to unfreeze require grad from the first step (so every rank's DDP registers the same
    parameters) but get no gradient until model.finetune.start_epoch; DDP accepts that only with
    find_unused_parameters=True. Such parameters keep grad None, so the optimizer leaves them alone.
    """
    start = finetune_options(cfg.model.get("finetune"), cfg.model.backbone).first_epoch
    strategy = cfg.trainer.get("strategy")
    if not start or not isinstance(strategy, str) or not strategy.startswith("ddp") or "find_unused" in strategy:
        return {}
    return {"strategy": f"{strategy}_find_unused_parameters_true"}


def config_hash(cfg: DictConfig) -> str:
    """Hash of what determines the result (not where files go or whether we resume)."""
    keep = {
        k: v
        for k, v in OmegaConf.to_container(cfg, resolve=False).items()
        if k not in ("paths", "hydra", "ckpt_path", "tags", "callbacks", "logger")
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build(cfg: DictConfig, **kwargs: Any) -> Any:
    """hydra's instantiate, but our own one-line errors come out unwrapped."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, FmnistError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from e
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [build(c) for c in group.values() if c is not None and "_target_" in c]
