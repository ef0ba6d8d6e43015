"""Any torchvision classifier as a backbone, by one generic rule per question.

- Which names: `torchvision.models.list_models(module=torchvision.models)` (the ImageNet
  classifiers; detection, segmentation, video and quantized models live in submodules).
- Surgery: the last module that outputs the ImageNet classes (a Linear, or SqueezeNet's 1x1 Conv2d)
  becomes Identity; the pooled feature width is then measured by a forward pass on the meta device
  (shapes only: no memory, no arithmetic), never tabled.
- Preprocessing: the weights' own transforms (crop size, mean, std); with no weights, the default
  weights' (their metadata needs no download). An image size the architecture cannot take (ViT's
  position embedding fixes its size) is refused by the same meta forward.
- Stages for fine-tuning: the module tree is walked down while one child holds most of the
  parameters among few (ResNet keeps conv1 ... layer4; ConvNeXt, EfficientNet and Swin open up
  `features`; ViT `encoder.layers`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from fmnist_tl.core import FmnistError

# The classes every torchvision classifier is built for (ImageNet-1k).
IMAGENET_CLASSES = 1000
# A module tree is opened while it has at most this many parameter-holding children and one of
# them holds most of its parameters: a trunk (`features`, `encoder.layers`), not a list of stages.
TRUNK_MAX_CHILDREN = 3
# Stages above the last one with at least this share of the backbone's parameters (a closing
# LayerNorm) come along with it in `last_K`.
TINY_STAGE_SHARE = 0.01
LAST_K = re.compile(r"last_(\d+)")


def classifier_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_name(backbone: str) -> None:
    names = classifier_names()
    if backbone not in names:
        close = difflib.get_close_matches(backbone, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise FmnistError(
            f"model.backbone={backbone} is not a torchvision classifier; {hint}"
            "any name in torchvision.models.list_models(module=torchvision.models) works"
        )


def weights_enum(backbone: str) -> type:
    check_name(backbone)
    return torchvision.models.get_model_weights(backbone)


def weight_names(backbone: str) -> list[str]:
    """The weights names of `backbone`, aliases (DEFAULT) included."""
    return list(weights_enum(backbone).__members__)


def is_weights_file(weights: str) -> bool:
    """model.weights names a file rather than a torchvision weights enum (those never hold / or .)."""
    return "/" in weights or "." in weights


def check_weights(backbone: str, weights: str | None) -> None:
    if weights is None or is_weights_file(weights):
        return
    names = weight_names(backbone)
    if weights not in names:
        close = difflib.get_close_matches(weights, names, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise FmnistError(
            f"model.weights={weights} is not a torchvision weights name for {backbone}; {hint}"
            f"choose one of {', '.join(names)}, a state_dict file, or null for random init"
        )


def weights_meta(backbone: str, weights: str | None) -> torchvision.models.WeightsEnum:
    """The weights whose metadata and transforms preprocessing follows: the named ones, else the default."""
    enum = weights_enum(backbone)
    if weights is not None and not is_weights_file(weights):
        return enum[weights]
    return enum["DEFAULT"]


@dataclass(frozen=True)
class Preprocessing:
    image_size: int
    mean: list[float]
    std: list[float]


def default_preprocessing(backbone: str, weights: str | None) -> Preprocessing:
    """What the weights were evaluated with: their crop size (Fashion-MNIST is resized straight to
    it, no crop), mean and std."""
    t = weights_meta(backbone, weights).transforms()
    return Preprocessing(int(t.crop_size[0]), [float(m) for m in t.mean], [float(s) for s in t.std])


def arch_kwargs(backbone: str, weights: str | None) -> dict[str, int]:
    """What torchvision's builder sets from the weights it loads: the input size, for architectures
    that take it as an argument (ViT: its position embedding is sized for it)."""
    size = weights_meta(backbone, weights).meta.get("min_size", (1, 1))[0]
    takes_size = "image_size" in inspect.signature(type(_built_on_meta(backbone)).__init__).parameters
    return {"image_size": int(size)} if takes_size and size > 1 else {}


def _get_model(backbone: str, device: str | None, kwargs: dict[str, int]) -> nn.Module:
    if device is None:
        return torchvision.models.get_model(backbone, weights=None, **kwargs)
    try:
        with torch.device(device):
            return torchvision.models.get_model(backbone, weights=None, **kwargs)
    except (NotImplementedError, RuntimeError):  # RegNet's builder computes its widths with tensors
        # Built on the CPU, then moved: its random init must not draw from the global RNG, or the
        # first seeded build in a process would differ from the next (a head-only checkpoint's rebuild).
        with torch.random.fork_rng(devices=[]):
            return torchvision.models.get_model(backbone, weights=None, **kwargs).to(device)


@functools.lru_cache(maxsize=8)
def _built_on_meta(backbone: str) -> nn.Module:
    return _get_model(backbone, "meta", {})


def new_classifier(backbone: str, weights: str | None = None, device: str | None = None) -> nn.Module:
    """The torchvision model for these weights (its architecture), random init; on `device`="meta"
    the structure only."""
    check_name(backbone)
    return _get_model(backbone, device, arch_kwargs(backbone, weights))


def classifier_layer(net: nn.Module) -> str:
    """The dotted name of the layer that outputs the classes: the last one registered that does."""
    found = [
        name
        for name, m in net.named_modules()
        if (isinstance(m, nn.Linear) and m.out_features == IMAGENET_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == IMAGENET_CLASSES and m.kernel_size == (1, 1))
    ]
    if not found:
        raise FmnistError(f"{type(net).__name__} has no layer that outputs {IMAGENET_CLASSES} classes to remove")
    return found[-1]


def strip_classifier(net: nn.Module) -> nn.Module:
    """Replace the classifier layer by Identity, in place: the net then outputs its pooled features."""
    parent, _, leaf = classifier_layer(net).rpartition(".")
    setattr(net.get_submodule(parent), leaf, nn.Identity())
    # Auxiliary heads (GoogLeNet, Inception v3) only run in train mode and are not features.
    for aux in ("aux1", "aux2", "AuxLogits"):
        if getattr(net, aux, None) is not None:
            setattr(net, aux, None)
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
    return net


@functools.lru_cache(maxsize=64)
def _meta_backbone(backbone: str, weights: str | None = None) -> nn.Module:
    return strip_classifier(new_classifier(backbone, weights, "meta")).eval()


@functools.lru_cache(maxsize=256)
def _feature_dim(backbone: str, weights: str | None, image_size: int) -> int | str:
    """The pooled feature width at `image_size`, or why the architecture refuses that size."""
    try:
        with torch.no_grad():
            out = _meta_backbone(backbone, weights)(torch.empty(1, 3, image_size, image_size, device="meta"))
    except Exception as e:  # an assert on the size, or a feature map that shrank to nothing
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if out.dim() != 2:
        return f"its features have shape {tuple(out.shape)}, not (batch, width)"
    return int(out.shape[1])


def feature_dim(backbone: str, weights: str | None, image_size: int) -> int:
    """The pooled feature width of `backbone` (built for `weights`) at `image_size`, with a one-line
    refusal for a size it cannot take."""
    dim = _feature_dim(backbone, weights, int(image_size))
    if isinstance(dim, str):
        native = default_preprocessing(backbone, weights).image_size
        raise FmnistError(
            f"model.image_size={image_size} does not fit {backbone} ({dim}); use {native} "
            "(its weights' size: model.image_size=null) or another size the architecture takes"
        )
    return dim


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stages_of(module: nn.Module, prefix: str) -> list[tuple[str, int]]:
    children = [(name, child, _param_count(child)) for name, child in module.named_children()]
    children = [(name, child, n) for name, child, n in children if n > 0]
    total = sum(n for _, _, n in children)
    stages: list[tuple[str, int]] = []
    opened = len(children) <= TRUNK_MAX_CHILDREN
    for name, child, n in children:
        full = f"{prefix}{name}"
        if opened and 2 * n > total and len([c for c in child.children() if _param_count(c)]) > 1:
            stages += _stages_of(child, f"{full}.")
        else:
            stages.append((full, n))
    return stages


@functools.lru_cache(maxsize=64)
def _stages(backbone: str) -> tuple[tuple[str, int], ...]:
    return tuple(_stages_of(_meta_backbone(backbone), ""))


def stage_names(backbone: str) -> list[str]:
    """The backbone's stages, input to output: what model.finetune.unfreeze names."""
    return [name for name, _ in _stages(backbone)]


def last_stages(backbone: str, k: int) -> list[str]:
    """The top `k` stages, with the tiny stages above them (a closing norm layer)."""
    stages = list(_stages(backbone))
    total = sum(n for _, n in stages)
    tail: list[str] = []
    while len(stages) > 1 and stages[-1][1] < TINY_STAGE_SHARE * total:
        tail.insert(0, stages.pop()[0])
    if not 1 <= k <= len(stages):
        raise FmnistError(
            f"model.finetune.unfreeze=last_{k}: {backbone} has {len(stages)} stages ({stages[0][0]} ... "
            f"{stages[-1][0]}); use last_1 ... last_{len(stages)}, or all"
        )
    return [name for name, _ in stages[-k:]] + tail


def resolve_stages(backbone: str, unfreeze: Sequence[str]) -> list[str]:
    """Stage names, `last_K` and `all` spelled out: the stages in input-to-output order, or ["all"]."""
    if "all" in unfreeze:
        return ["all"]
    names = stage_names(backbone)
    wanted: set[str] = set()
    for item in unfreeze:
        match = LAST_K.fullmatch(item)
        if match:
            wanted.update(last_stages(backbone, int(match.group(1))))
        elif item in names:
            wanted.add(item)
        else:
            close = difflib.get_close_matches(item, names, n=2)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            shown = ", ".join(names) if len(names) <= 12 else f"{', '.join(names[:4])}, ..., {', '.join(names[-4:])}"
            raise FmnistError(
                f"model.finetune.unfreeze: {item} is not a stage of {backbone}; {hint}"
                f"use its stages ({shown}), last_K (the K top stages) or all"
            )
    return [n for n in names if n in wanted]


def set_frozen_modes(backbone: nn.Module, stages: Sequence[nn.Module], train_norm: bool) -> None:
    """Training mode of a frozen backbone whose `stages` fine-tune: everything else in eval (BatchNorm
    statistics fixed; dropout and stochastic depth off), the stages' dropout and stochastic depth on,
    and their BatchNorm statistics updating only with `train_norm`."""
    backbone.eval()
    for stage in stages:
        for m in stage.modules():  # one module at a time: train() would reach the BatchNorm below it
            m.training = train_norm or not isinstance(m, nn.modules.batchnorm._BatchNorm)


def preprocessing(
    backbone: str,
    weights: str | None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[int, list[float], list[float]]:
    """model.image_size/mean/std, each None filled in from the weights (`default_preprocessing`);
    a size the architecture cannot take is refused (`feature_dim`)."""
    default = default_preprocessing(backbone, weights)
    size = default.image_size if image_size is None else int(image_size)
    feature_dim(backbone, weights, size)
    return size, list(default.mean if mean is None else mean), list(default.std if std is None else std)
