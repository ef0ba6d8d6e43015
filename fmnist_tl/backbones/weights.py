"""Backbones by name, their weights (torchvision, a local file, a seeded random init), and the one
safe loader every file we read goes through: torch.load with weights_only=True.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from fmnist_tl.backbones.registry import (
    check_name,
    check_weights,
    is_weights_file,
    new_classifier,
    strip_classifier,
    weight_names,
)
from fmnist_tl.core import FmnistError, module_sha256, sha256_file

# What `safe_load` expects of a file, by kind: its description, and the fix when the file is not one.
FILE_KINDS = {
    "checkpoint": ("an fmnist_tl checkpoint", "pass a .ckpt file from a training run"),
    "weights": ("a weights file", "pass a state_dict saved with torch.save"),
}


def check_backbone(backbone: str, weights: str | None) -> None:
    """Any torchvision classifier; weights a name of its weights enum, a state_dict file, or None."""
    check_name(backbone)
    check_weights(backbone, weights)
    if weights is not None and is_weights_file(weights) and not Path(weights).is_file():
        raise FmnistError(
            f"model.weights={weights} does not exist (a path, not a weights name of {backbone}); "
            f"pass an existing state_dict file or one of {', '.join(weight_names(backbone))}"
        )


def weights_source(weights: str | None, weights_path: str | None) -> tuple[str | None, str | None]:
    """(torchvision weights name, file): model.weights may name a file, as model.weights_path does."""
    if weights is not None and is_weights_file(weights):
        return None, weights_path or weights
    return weights, weights_path


def safe_load(path: str | os.PathLike, name: str, kind: str, fix: str, **load_kwargs: Any) -> Any:
    """torch.load(weights_only=True), with one-line errors that start with `name` (e.g. "checkpoint X").

    Four problems, four messages: a missing file; a file torch.save never wrote (a text file, an
    image, an empty file) is not a `kind` file at all; a torch file whose pickle holds anything but
    tensors and plain containers is refused, since loading it could run code; anything else torch
    cannot read (a cut-off download) is corrupt or truncated, and `fix` says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"{name} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive holding <name>/data.pkl (legacy format: a pickle, protocol 2+,
    # which starts with 0x80). A zip whose directory cannot be read is left to torch: cut off.
    is_zip = head.startswith(b"PK\x03\x04")
    if is_zip and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_zip = any(n.rsplit("/", 1)[-1] == "data.pkl" for n in archive.namelist())
    if not (is_zip or head[:1] == b"\x80"):
        what = "an empty file" if not head else "not a file torch.save wrote"
        expected, wrong_kind_fix = FILE_KINDS[kind]
        raise FmnistError(f"{name} is not {expected} ({what}); {wrong_kind_fix}")
    try:
        return torch.load(path, weights_only=True, **load_kwargs)
    except pickle.UnpicklingError as e:
        raise FmnistError(
            f"{name} refused: it holds objects other than tensors and plain containers (loading it could run code)"
        ) from e
    except Exception as e:  # truncated zip, bad magic, EOF ...
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise FmnistError(f"{name} is corrupt or truncated ({why}); {fix}") from e


def load_state_dict_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state_dict file (or a checkpoint's state_dict), through `safe_load`."""
    name = f"{what} {path}"
    obj = safe_load(path, name, "weights", "delete it and fetch it again", map_location="cpu")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FmnistError(f"{name} is not a state_dict (a dict of tensors)")
    return obj


def read_checkpoint(
    path: str | os.PathLike, name: str | None = None, fix: str = "use another checkpoint", **load_kwargs: Any
) -> dict[str, Any]:
    """One of our Lightning checkpoints, through `safe_load`; `name` starts its errors ("checkpoint PATH")."""
    name = name or f"checkpoint {path}"
    ckpt = safe_load(path, name, "checkpoint", fix, **{"map_location": "cpu", **load_kwargs})
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise FmnistError(f"{name} is not an fmnist_tl checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def state_mismatch(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """None when `state` has exactly the keys and shapes of `expected`, else which keys differ (one line)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    parts = [
        f"{name} keys: {few(keys)}"
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
        if keys
    ]
    return "; ".join(parts) or None


def load_backbone_state(net: nn.Module, state: dict[str, torch.Tensor], source: str, backbone: str) -> None:
    mismatch = state_mismatch(net.state_dict(), state)
    if mismatch:
        raise FmnistError(
            f"{source} does not fit {backbone}: {mismatch}; pass weights saved from the same architecture"
        )
    net.load_state_dict(state, strict=True)


def hub_cache_path(backbone: str, weights: str) -> Path:
    """Where torchvision keeps (or would download) these weights: the torch hub cache."""
    url = torchvision.models.get_model_weights(backbone)[weights].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def fetch_torchvision_weights(backbone: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """The real torchvision path (download into the torch hub cache), with offline-friendly errors."""
    enum = torchvision.models.get_model_weights(backbone)[weights]
    cached = hub_cache_path(backbone, weights)
    if not cached.is_file():
        made = [d for d in (cached.parent, cached.parent.parent) if not d.exists()]  # checkpoints/, hub/
        try:
            # torch.hub's own download (what torchvision calls) without the "Downloading: ..." line it
            # prints first; the file appears only once complete and its hash checked.
            cached.parent.mkdir(parents=True, exist_ok=True)
            hash_prefix = re.search(torch.hub.HASH_REGEX, cached.name)
            torch.hub.download_url_to_file(enum.url, str(cached), hash_prefix and hash_prefix.group(1), progress=True)
        except Exception as e:  # URLError, HTTPError, socket errors, hash mismatch
            for folder in made:  # no empty folders left in the hub cache
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise FmnistError(
                f"cannot get {backbone} {weights} weights ({type(e).__name__}: {e}); put {cached.name} "
                f"(from {enum.url}) at {cached}, or pass model.weights_path=FILE, or model.weights=null for random init"
            ) from e
    state = load_state_dict_file(cached, "cached torchvision weights")
    return state, f"torchvision:{backbone}.{weights}:sha256={sha256_file(cached)}"


# The backbones built in this process, by what determines their weights (`weights_memo_key`): the
# trials of a sweep run one after another in one process (Hydra's basic launcher; joblib reuses
# its workers too) and would each pay ResNet50's init or weights load and its hash again.
# One entry: a new key replaces the old one.
_BUILT: dict[tuple, tuple[dict[str, torch.Tensor], str]] = {}
_SHA256: dict[tuple, str] = {}


def weights_memo_key(
    backbone: str, weights: str | None, weights_path: str | None, load: bool, init_seed: int | None
) -> tuple | None:
    """This process's memo key for a built backbone and its `weights_sha256`: what determines its weights,
    files by their stat; None when nothing does (unseeded init)."""
    weights, weights_path = weights_source(weights, weights_path)
    if load and weights_path:
        try:
            st = os.stat(weights_path)
        except OSError:
            return None  # build_backbone says what is wrong
        return (backbone, "file", os.path.realpath(weights_path), st.st_size, st.st_mtime_ns, st.st_ino)
    if load and weights:
        cached = hub_cache_path(backbone, weights)
        try:
            st = cached.stat()
        except OSError:
            return None
        return (backbone, "torchvision", weights, str(cached), st.st_size, st.st_mtime_ns, st.st_ino)
    return None if init_seed is None else (backbone, "random-init", init_seed, torch.__version__)


def build_backbone(
    backbone: str, weights: str | None, weights_path: str | None, load: bool = True, init_seed: int | None = None
) -> tuple[nn.Module, str]:
    """Return the backbone with its classifier replaced by Identity (backbones.strip_classifier), and an
    identity string for its weights; `weights` may name a state_dict file.

    With `init_seed`, the random init (kept for random-init runs, overwritten by loaded weights) draws
    from its own generator seeded with it, so a head-only checkpoint can rebuild the same backbone,
    and the global RNG (the head's init next) does not depend on the backbone. A backbone built
    before in this process from the same key is copied, not built again.
    """
    check_backbone(backbone, weights)
    weights, weights_path = weights_source(weights, weights_path)
    key = weights_memo_key(backbone, weights, weights_path, load, init_seed)
    if key is not None and key in _BUILT:
        state, identity = _BUILT[key]
        net = strip_classifier(new_classifier(backbone, weights, "meta"))  # the structure only: no init
        net.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        return net, identity
    net, identity = _build_backbone(backbone, weights, weights_path, load, init_seed)
    if key is not None:
        _BUILT.clear()
        _BUILT[key] = ({k: v.detach().clone() for k, v in net.state_dict().items()}, identity)
    return net, identity


def _build_backbone(
    backbone: str, weights: str | None, weights_path: str | None, load: bool, init_seed: int | None
) -> tuple[nn.Module, str]:
    if init_seed is None:
        net = new_classifier(backbone, weights)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = new_classifier(backbone, weights)
    identity = "random-init"
    if load and weights_path:
        state = load_state_dict_file(weights_path, "model.weights_path")
        load_backbone_state(net, state, f"model.weights_path {weights_path}", backbone)
        identity = f"file:{Path(weights_path).name}:sha256={sha256_file(weights_path)}"
    elif load and weights:
        state, identity = fetch_torchvision_weights(backbone, weights)
        load_backbone_state(net, state, identity, backbone)
    return strip_classifier(net), identity


def weights_sha256(net: nn.Module, key: tuple | None = None) -> str:
    """sha256 of the backbone's tensors, the content half of its identity (`backbone_identity`).

    Args:
        key: the backbone's `weights_memo_key`: hashed once per process and key. None (a backbone that
            may have changed since it was built) hashes every time.
    """
    if key is None or key not in _SHA256:
        sha = module_sha256(net)
        if key is None:
            return sha
        _SHA256.clear()
        _SHA256[key] = sha
    return _SHA256[key]


def backbone_identity(backbone: str, sha256: str, preprocess: nn.Module) -> dict[str, Any]:
    """What a backbone's output depends on: network, weights (`weights_sha256`) and preprocessing.

    The one shape used by feature-cache fingerprints, probe and gate records, ONNX models and
    head-only checkpoints. `preprocess` is the model's ImagePreprocess (image_size, mean, std).
    """
    return {
        "backbone": backbone,
        "weights_sha256": sha256,
        "image_size": int(preprocess.image_size),
        "mean": [round(float(m), 8) for m in preprocess.mean.flatten().tolist()],
        "std": [round(float(s), 8) for s in preprocess.std.flatten().tolist()],
    }


def identity_sha256(identity: Mapping[str, Any]) -> str:
    """The weights' sha256 that a checkpoint's backbone_identity records (written as `sha256` before it
    took backbone_identity's shape)."""
    return identity["weights_sha256"] if "weights_sha256" in identity else identity["sha256"]


def rebuildable(hparams: Mapping[str, Any]) -> bool:
    """A backbone its identity rebuilds: named torchvision weights, a weights file or a seeded init."""
    return bool(hparams.get("weights") or hparams.get("weights_path")) or hparams.get("init_seed") is not None


def build_backbone_of(hparams: Mapping[str, Any], load: bool = True) -> tuple[nn.Module, str]:
    """The backbone a model's hyper-parameters name."""
    return build_backbone(
        hparams["backbone"], hparams.get("weights"), hparams.get("weights_path"), load, hparams.get("init_seed")
    )


def backbone_state_of(ckpt: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of a head-only checkpoint (see `strip_backbone`), keyed as in the model.

    Rebuilt from the identity it records (torchvision weights, a weights file, or a seeded random
    init) and checked against the sha256 of the tensors it was trained on (the feature cache's key).
    """
    try:
        net, _ = build_backbone_of(ckpt["hyper_parameters"])
    except FmnistError as e:
        raise FmnistError(f"{what} holds the head only; its backbone cannot be rebuilt: {e}") from e
    check_weights_sha256(net, ckpt, what)
    return {f"backbone.{k}": v for k, v in net.state_dict().items()}


def check_weights_sha256(net: nn.Module, ckpt: Mapping[str, Any], what: str) -> None:
    """Refuse a rebuilt backbone whose tensors are not the ones a head-only checkpoint was trained on."""
    sha, recorded = weights_sha256(net), identity_sha256(ckpt["backbone_identity"])
    weights_id = ckpt.get("weights_id") or ckpt["backbone_identity"].get("weights_id")
    if sha != recorded:
        raise FmnistError(
            f"{what} was trained on a backbone with sha256 {recorded[:16]}... ({weights_id}), "
            f"but the one built here has {sha[:16]}...: the weights file changed, or this torch/torchvision "
            "initialises differently; use the same weights (and versions) as the run that wrote it"
        )


def fill_rebuilt_backbone(checkpoint: dict[str, Any], net: nn.Module, what: str) -> None:
    """Complete a head-only checkpoint with `net`, the backbone its identity rebuilt, once its sha256 checks."""
    check_weights_sha256(net, checkpoint, what)
    checkpoint["state_dict"].update({f"backbone.{k}": v for k, v in net.state_dict().items()})


def strip_backbone(checkpoint: dict[str, Any], identity: dict[str, Any]) -> None:
    """Make `checkpoint` head-only: a frozen backbone is most of a checkpoint's size and never
    changes, so keep its `backbone_identity` instead (the hyper-parameters rebuild it, the sha256
    proves the rebuild)."""
    state = checkpoint["state_dict"]
    for key in [k for k in state if k.startswith("backbone.")]:
        del state[key]
    checkpoint["backbone_identity"] = identity


def restore_backbone(checkpoint: dict[str, Any], net: nn.Module, sha256: Callable[[], str]) -> None:
    """Put the backbone back into a head-only checkpoint's state_dict (no-op for a full one): `net`'s
    tensors when `sha256()` is the one it records, else the backbone its identity rebuilds."""
    identity = checkpoint.get("backbone_identity")
    if identity is None:
        return
    if sha256() == identity_sha256(identity):
        checkpoint["state_dict"].update({f"backbone.{k}": v for k, v in net.state_dict().items()})
    else:
        checkpoint["state_dict"].update(backbone_state_of(checkpoint, "the checkpoint"))


def init_from_state(path: str, hparams: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> tuple[dict, str]:
    """The tensors of model.finetune.init_from (a head-trained checkpoint) for a model with `hparams`
    and state_dict `expected`, and the weights identity they give it."""
    ckpt = read_checkpoint(path, f"model.finetune.init_from {path}")

    def arch(hp: Mapping[str, Any]) -> dict[str, Any]:
        hidden = (hp.get("head") or {}).get("hidden_dims", [256])
        return {
            "backbone": hp.get("backbone"),
            "head.hidden_dims": [int(w) for w in hidden],
            "num_classes": hp.get("num_classes"),
        }

    theirs, ours = arch(ckpt["hyper_parameters"]), arch(hparams)
    differ = [k for k in ours if theirs[k] != ours[k]]
    if differ:
        raise FmnistError(
            f"model.finetune.init_from={path} does not fit this model: it has "
            + ", ".join(f"{k}={theirs[k]}" for k in differ)
            + ", the config "
            + ", ".join(f"model.{k}={ours[k]}" for k in differ)
            + "; set the same values or use a checkpoint of this architecture"
        )
    if "backbone_identity" in ckpt:  # a head-only checkpoint: its backbone comes from its own identity
        ckpt["state_dict"].update(backbone_state_of(ckpt, f"model.finetune.init_from={path}"))
    mismatch = state_mismatch(expected, ckpt["state_dict"])
    if mismatch:
        raise FmnistError(f"model.finetune.init_from={path} does not fit this model: {mismatch}")
    origin = ckpt.get("weights_id", "unknown")
    return ckpt["state_dict"], f"init_from:{Path(path).name}:sha256={sha256_file(path)} (from {origin})"
