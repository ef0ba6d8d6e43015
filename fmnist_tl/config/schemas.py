"""The config schemas: one dataclass per config group, registered in Hydra's ConfigStore.

Each group's YAML (conf/<group>/*.yaml) starts from its schema (`defaults: [schema, _self_]`); the
schema declares the keys, their types and, next to each field, the range it must be in. Hydra refuses
unknown keys and wrong types while composing; `check_config()` refuses out-of-range values before
anything is built. Groups of Lightning or torch objects (`trainer`, `callbacks`, `logger`, the
optimizer and scheduler) stay open: those classes' signatures declare their keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fmnist_tl.core import FmnistError

Rule = Callable[[str, Any], None]


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def at_least(low: int, why: str = "", optional: bool = False) -> Rule:
    def rule(key: str, value: Any) -> None:
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            tail = " or null" if optional else ""
            raise FmnistError(f"{key}={value!r} must be an integer >= {low}{tail}{why}")

    return rule


def positive(key: str, value: Any) -> None:
    if not _number(value) or value <= 0:
        raise FmnistError(f"{key}={value!r} must be a positive finite number")


def optional(rule: Rule) -> Rule:
    """`rule`, with null allowed."""
    return lambda key, value: None if value is None else rule(key, value)


def non_negative(key: str, value: Any) -> None:
    if value is not None and (not _number(value) or value < 0):
        raise FmnistError(f"{key}={value!r} must be a number >= 0")


def in_range(low: float, high: float, high_open: bool = False) -> Rule:
    def rule(key: str, value: Any) -> None:
        inside = _number(value) and low <= value and (value < high if high_open else value <= high)
        if not inside:
            raise FmnistError(f"{key}={value!r} must be in [{low}, {high}{')' if high_open else ']'}")

    return rule


def one_of(*choices: Any) -> Rule:
    def rule(key: str, value: Any) -> None:
        # bool is an int: 1 must not pass for true, nor true for 1.
        if not any(value == c and type(value) is type(c) for c in choices):
            shown = ", ".join("true" if c is True else "false" if c is False else str(c) for c in choices)
            raise FmnistError(f"{key}={value!r} must be one of {shown}")

    return rule


def each(rule: Rule) -> Rule:
    def check_items(key: str, values: Any) -> None:
        for i, value in enumerate(values or []):
            rule(f"{key}[{i}]", value)

    return check_items


def trainer_parameters() -> list[str]:
    """The trainer group is Lightning's Trainer: its signature is the schema."""
    import lightning as L

    return sorted(set(inspect.signature(L.Trainer.__init__).parameters) - {"self"})


def trainer_keys(key: str, node: Any) -> None:
    allowed = trainer_parameters()
    unknown = sorted(k for k in node if not str(k).startswith("_") and k not in allowed)
    if unknown:
        raise FmnistError(unknown_key_message(f"{key}.{unknown[0]}", allowed, can_add=False))
    epochs = node.get("max_epochs")
    if epochs is not None and epochs != -1:
        at_least(1)(f"{key}.max_epochs", epochs)


# Keys that moved to another group. The model owns its preprocessing (its checkpoints carry it).
MOVED_KEYS = {f"data.{key}": f"model.{key}" for key in ("image_size", "mean", "std", "channels_last")}


def unknown_key_message(
    full_key: str, known: list[str], can_add: bool = False, value: Any = None, entry: str = "train"
) -> str:
    """`unknown config key 'x'` with the close matches among `known`; for a key that moved (set
    to `value` in conf/<entry>.yaml's command), where it went instead."""
    import difflib

    new = MOVED_KEYS.get(full_key)
    if new is not None:
        if entry != "train":
            return f"{full_key} moved to {new}; {entry} takes it from the checkpoint (ckpt_path): drop that override"
        value = str(value).lower() if isinstance(value, bool) else value
        return f"{full_key} moved to {new}" + (f"; use {new}={value}" if value is not None else "")
    *parent, name = full_key.split(".")
    close = difflib.get_close_matches(name, known, n=2)
    hint = f"; did you mean {' or '.join('.'.join([*parent, c]) for c in close)}?" if close else ""
    add = f" (to add a key on purpose: +{full_key}=...)" if can_add else ""
    return f"unknown config key '{full_key}'{hint}{add}"


def checked(default: Any = MISSING, *rules: Rule) -> Any:
    """A field whose value `check_config()` runs through `rules`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"rules": rules})
    return field(default=default, metadata={"rules": rules})


# ------------------------------------------------------------------------------------ groups


@dataclass
class DataConfig:
    """The keys every `data` config has; each datamodule's schema adds its own (config/data_schemas.py)."""

    _target_: str = MISSING
    batch_size: int = checked(MISSING, at_least(1))
    eval_batch_size: int | None = checked(None, at_least(1, optional=True))
    num_workers: int = checked(0, at_least(0))
    pin_memory: Any = checked("auto", one_of("auto", True, False))
    augment: bool = False
    seed: int = MISSING
    cache_features: Any = checked("auto", one_of("auto", True, False))


@dataclass
class HeadConfig:
    hidden_dims: list[int] = checked(MISSING, each(at_least(1)))
    dropout: float = checked(MISSING, in_range(0, 1, high_open=True))


@dataclass
class FinetuneConfig:
    """model.finetune (conf/model/resnet50.yaml says what each key means), parsed once per job by
    `fmnist_tl.training.finetune_options`; models and checkpoints hold `as_dict()`."""

    start_epoch: int | None = checked(None, at_least(0, optional=True))
    init_from: str | None = None
    # A stage name, a list of them, last_K or all; parsed: stage names, input-to-output order, or ["all"].
    unfreeze: Any = checked(["last_1"])
    backbone_lr_factor: float = checked(0.1, positive)
    bn: str = checked("frozen", one_of("frozen", "train"))
    lr: float | None = checked(None, optional(positive))
    warmup_epochs: int = checked(0, at_least(0))
    schedule: str = checked("cosine", one_of("cosine", "constant"))

    @property
    def first_epoch(self) -> int | None:
        """First epoch that trains the backbone; None: head only. A run from `init_from` fine-tunes from 0."""
        return self.start_epoch if self.start_epoch is not None else (0 if self.init_from else None)

    def as_dict(self) -> dict[str, Any]:
        """Plain containers, so that checkpoints load with weights_only=True."""
        return dataclasses.asdict(self)


def optimizer_rules(key: str, node: Any) -> None:
    """The optimizer is any torch optimizer (its signature declares its keys); lr is always checked."""
    positive(f"{key}.lr", node.get("lr"))
    non_negative(f"{key}.weight_decay", node.get("weight_decay"))


@dataclass
class ModelConfig:
    _target_: str = "fmnist_tl.training.TransferClassifier"
    backbone: str = MISSING
    weights: str | None = MISSING
    weights_path: str | None = None
    num_classes: int = checked(MISSING, at_least(2))
    freeze_backbone: bool = True
    head: HeadConfig = field(default_factory=HeadConfig)
    optimizer: Any = checked(MISSING, optimizer_rules)
    scheduler: Any = None
    # The preprocessing the weights expect: the model owns it (and its checkpoints carry it); null
    # takes it from the weights' own transforms (fmnist_tl/backbones/registry.py).
    image_size: int | None = checked(None, at_least(32, " (CNNs downsample 32x)", optional=True))
    mean: list[float] | None = None
    std: list[float] | None = None
    channels_last: bool = True
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class FeaturesConfig:
    """The `features` group: how the frozen backbone's features are extracted and cached."""

    # Where extracted features, probe records and ONNX models are kept.
    cache_dir: str | None = None
    # Images per forward pass; null: fmnist_tl.features.extraction.default_batch_size (by device).
    batch_size: int | None = checked(None, at_least(1, optional=True))
    # auto: the fastest candidate measured here that passes the fidelity gate (features/probe.py).
    backend: str = checked("auto", one_of("auto", "torch", "onnxruntime"))
    precision: str = checked("auto", one_of("auto", "32", "bf16", "16", "int8"))
    # auto: bfloat16 after bf16 extraction (lossless), float16 otherwise.
    store_dtype: str = checked("auto", one_of("auto", "float16", "bfloat16", "float32"))
    # auto: compile when the job is worth at least `compile_min_images` images at 224 px.
    compile: Any = checked("auto", one_of("auto", True, False))
    compile_min_images: int = checked(4000, at_least(0))
    progress: bool = True
    # CPU threads for head steps on cached features (null: torch's default). A head step is a few
    # small matmuls, and on a busy CPU OpenMP barriers cost more than a second thread gives.
    head_threads: int | None = checked(1, at_least(1, optional=True))
    # Below this much work (images at 224 px) auto settings are not probed: torch, fp32.
    probe_min_images: int = checked(4000, at_least(0))
    probe_batches: int = checked(4, at_least(1))
    # int8 calibration and the fidelity gate's sample: disjoint seeded samples of the training split.
    calibration_images: int = checked(256, at_least(1))
    gate_images: int = checked(128, at_least(1))
    calibration_seed: int = checked(0, at_least(0))
    # The fidelity gate: cosine similarity to fp32 features, mean and worst over the sample.
    gate_mean_cosine: float = checked(0.999, in_range(-1, 1))
    gate_worst_cosine: float = checked(0.98, in_range(-1, 1))


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    log_dir: str = MISSING
    cache_dir: str = MISSING
    output_dir: str = MISSING


# ------------------------------------------------------------------------------ entry configs


def validation_metric(key: str, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith("val/"):
        raise FmnistError(
            f"{key}={value!r} must be a validation metric (val/acc, val/f1, val/loss): "
            "runs are ranked on it, and test metrics are only reported"
        )


@dataclass
class ObjectiveConfig:
    """What training optimises; the checkpoint, early stopping, the sweeper and the summary read it."""

    metric: str = checked(MISSING, validation_metric)
    mode: str = checked(MISSING, one_of("max", "min"))


@dataclass
class TrainReportConfig:
    plots: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    features: FeaturesConfig = MISSING
    paths: PathsConfig = MISSING
    trainer: Any = checked(MISSING, trainer_keys)
    callbacks: Any = None
    logger: Any = None
    task_name: str = MISSING
    tags: list[str] = field(default_factory=list)
    seed: int = MISSING
    ckpt_path: str | None = None
    test: bool = True
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    report: TrainReportConfig = field(default_factory=TrainReportConfig)


@dataclass
class EvaluateReportConfig:
    top_pairs: int = checked(MISSING, at_least(0))
    mistakes: int = checked(MISSING, at_least(0))


@dataclass
class EvaluateConfig:
    data: DataConfig = MISSING
    trainer: Any = checked(MISSING, trainer_keys)
    paths: PathsConfig = MISSING
    task_name: str = MISSING
    seed: int = MISSING
    ckpt_path: str | None = None
    report: EvaluateReportConfig = field(default_factory=EvaluateReportConfig)


# The export is also checked on a second, odd batch size: the batch dimension must really be dynamic.
ODD_BATCH = 3


@dataclass
class VerifyConfig:
    num_images: int = checked(MISSING, at_least(ODD_BATCH))


@dataclass
class ExportConfig:
    data: DataConfig = MISSING
    paths: PathsConfig = MISSING
    task_name: str = MISSING
    seed: int = MISSING
    ckpt_path: str | None = None
    format: str = checked(MISSING, one_of("onnx", "torchscript"))
    opset: int = checked(MISSING, at_least(7))
    verify: VerifyConfig = field(default_factory=VerifyConfig)


# The data group's schemas are registered by config/data_schemas.py.
GROUPS = {"model": ModelConfig, "features": FeaturesConfig, "paths": PathsConfig}
ENTRIES = {"train": TrainConfig, "evaluate": EvaluateConfig, "export": ExportConfig}


def register() -> None:
    """Schemas under each group as `schema` (a YAML's `defaults: [schema, _self_]`), entries as `<name>_schema`."""
    cs = ConfigStore.instance()
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=node)
    for name, node in ENTRIES.items():
        cs.store(name=f"{name}_schema", node=node)


register()


# ----------------------------------------------------------------------------------- checks


def check_config(cfg: DictConfig, schema: type | None = None, prefix: str = "", entry: str | None = None) -> None:
    """Refuse keys the schema lacks (a `+key=` override adds them past Hydra), then run every
    field's rules, and those of nested schemas, over a composed config."""
    schema = schema or OmegaConf.get_type(cfg)
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    entry = entry or next((name for name, node in ENTRIES.items() if node is schema), "train")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(k for k in cfg if k not in fields and k != "hydra")
    if unknown:
        value = OmegaConf.select(cfg, unknown[0], throw_on_missing=False)
        raise FmnistError(unknown_key_message(f"{prefix}{unknown[0]}", sorted(fields), value=value, entry=entry))
    for name, f in fields.items():
        node = cfg._get_node(name)
        nested = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
        if nested is not None and dataclasses.is_dataclass(nested):
            check_config(node, nested, f"{prefix}{name}.", entry)
        rules = f.metadata.get("rules", ())
        if rules:  # only these leaves are read: the others may interpolate what exists only in a run
            value = OmegaConf.select(cfg, name, throw_on_missing=False)
            for rule in rules:
                rule(f"{prefix}{name}", value)


def parse(schema: type, given: DictConfig | dict | None, prefix: str, see: str) -> DictConfig:
    """`given` (a group's values, also when built in Python rather than composed by Hydra) on `schema`:
    unknown keys, wrong types and out-of-range values refused in one line that starts with `prefix`
    and, for a wrong type, points at the YAML file `see`."""
    try:
        values = OmegaConf.to_container(given, resolve=True) if isinstance(given, DictConfig) else given
        node = OmegaConf.merge(OmegaConf.structured(schema), values or {})
    except OmegaConfBaseException as e:
        key = f"{prefix}{getattr(e, 'full_key', '') or ''}".rstrip(".")
        if isinstance(e, ConfigKeyError):
            raise FmnistError(unknown_key_message(key, [f.name for f in dataclasses.fields(schema)])) from e
        raise FmnistError(f"{key}: {str(e).strip().splitlines()[0]} (see {see})") from e
    check_config(node, schema, prefix)
    return node


def to_container(x: Any) -> Any:
    """Hydra hands DictConfigs; checkpoints must hold plain containers to load with weights_only=True."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x
