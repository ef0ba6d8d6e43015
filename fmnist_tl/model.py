"""A frozen torchvision ResNet backbone plus a new classifier head, as one LightningModule."""

from __future__ import annotations

import logging
import math
import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fmnist_tl.data import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess, holds_features
from fmnist_tl.utils import FmnistError, module_sha256, sha256_file

log = logging.getLogger(__name__)
# DDP warns when find_unused_parameters=True finds none; in a fine-tune run that is the fine-tune
# phase, after head-only epochs that did have unused parameters (the case the warning itself names).
warnings.filterwarnings("ignore", message=r".*find_unused_parameters=True was specified in DDP constructor.*")
# Under DDP Lightning asks for sync_dist=True on epoch-level logs; ours come from torchmetrics'
# compute(), which has already synced them across ranks.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self.log\('(train|val|test)/(acc|f1|loss_epoch)', \.\.\., sync_dist"
)

# Pooled feature width of each supported backbone; one code path builds all of them.
BACKBONES: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "weight_decay": 1e-4}
# Top-level children of a torchvision ResNet that hold parameters, input to output.
RESNET_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
# model.finetune (see conf/model/resnet50.yaml for what each key means).
FINETUNE_DEFAULTS: dict[str, Any] = {
    "start_epoch": None,
    "init_from": None,
    "unfreeze": ["layer4"],
    "backbone_lr_factor": 0.1,
    "bn": "frozen",
    "lr": None,
    "warmup_epochs": 0,
    "schedule": "cosine",
}


def weight_names(backbone: str) -> list[str]:
    return [w.name for w in torchvision.models.get_model_weights(backbone)]


def check_backbone(backbone: str, weights: str | None) -> None:
    if backbone not in BACKBONES:
        raise FmnistError(f"model.backbone={backbone} is not supported; choose one of {', '.join(BACKBONES)}")
    if weights is not None and weights not in weight_names(backbone):
        raise FmnistError(
            f"model.weights={weights} is not a torchvision weights name for {backbone}; "
            f"choose one of {', '.join(weight_names(backbone))} or null for random init"
        )


def load_state_dict_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: a file whose pickle would run code is refused, never run."""
    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FmnistError(f"{what} {path} refused: not a plain tensor file ({first})") from e
    except Exception as e:  # truncated zip, bad magic, EOF ...
        raise FmnistError(
            f"{what} {path} is corrupt or truncated ({type(e).__name__}: {e}); delete it and fetch it again"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FmnistError(f"{what} {path} is not a state_dict (a dict of tensors)")
    return obj


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


def load_checkpoint_file(path: str | os.PathLike, name: str, fix: str, **load_kwargs: Any) -> Any:
    """torch.load(weights_only=True) of a checkpoint, with one-line errors that start with `name`.

    Three different problems, three messages: a file torch.save never wrote (a text file, an
    image, an empty file) is not a checkpoint at all; a torch file whose pickle holds anything but
    tensors and plain containers is refused, since loading it could run code; anything else
    torch cannot read (a cut-off download) is corrupt or truncated, and `fix` says what to do.
    """
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
        raise FmnistError(f"{name} is not an fmnist_tl checkpoint ({what}); pass a .ckpt file from a training run")
    try:
        return torch.load(path, weights_only=True, **load_kwargs)
    except pickle.UnpicklingError as e:
        raise FmnistError(
            f"{name} refused: it holds objects other than tensors and plain containers (loading it could run code)"
        ) from e
    except Exception as e:
        raise FmnistError(f"{name} is corrupt or truncated ({type(e).__name__}); {fix}") from e


def read_checkpoint(
    path: str | os.PathLike, what: str = "checkpoint", map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """One of our Lightning checkpoints, loaded with weights_only=True (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise FmnistError(f"{what} {path} does not exist")
    ckpt = load_checkpoint_file(path, f"{what} {path}", "use another checkpoint", map_location=map_location)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise FmnistError(f"{what} {path} is not an fmnist_tl checkpoint (no state_dict/hyper_parameters)")
    return ckpt


def fetch_torchvision_weights(backbone: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """The real torchvision path (download into the torch hub cache), with offline-friendly errors."""
    enum = torchvision.models.get_model_weights(backbone)[weights]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not cached.is_file():
        try:
            enum.get_state_dict(progress=True, check_hash=True)
        except Exception as e:  # URLError, HTTPError, socket errors, hash mismatch
            raise FmnistError(
                f"cannot get {backbone} {weights} weights ({type(e).__name__}: {e}); put {cached.name} "
                f"(from {enum.url}) at {cached}, or pass model.weights_path=FILE, or model.weights=null for random init"
            ) from e
    state = load_state_dict_file(cached, "cached torchvision weights")
    return state, f"torchvision:{backbone}.{weights}:sha256={sha256_file(cached)}"


# The backbones built in this process, by what determines their weights (`backbone_key`): the
# trials of a sweep run one after another in one process (Hydra's basic launcher; joblib reuses
# its workers too) and would each pay ResNet50's init or weights load (~1 s) and hash (~0.5 s).
# One entry: a new key replaces the old one.
_BUILT: dict[tuple, tuple[dict[str, torch.Tensor], str]] = {}
_SHA256: dict[tuple, str] = {}


def backbone_key(
    backbone: str, weights: str | None, weights_path: str | None, load: bool, init_seed: int | None
) -> tuple | None:
    """What determines a built backbone's weights, files by their stat; None when nothing does (unseeded init)."""
    if load and weights_path:
        try:
            st = os.stat(weights_path)
        except OSError:
            return None  # build_backbone says what is wrong
        return (backbone, "file", os.path.realpath(weights_path), st.st_size, st.st_mtime_ns, st.st_ino)
    if load and weights:
        enum = torchvision.models.get_model_weights(backbone)[weights]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
        try:
            st = cached.stat()
        except OSError:
            return None
        return (backbone, "torchvision", weights, str(cached), st.st_size, st.st_mtime_ns, st.st_ino)
    return None if init_seed is None else (backbone, "random-init", init_seed, torch.__version__)


def build_backbone(
    backbone: str, weights: str | None, weights_path: str | None, load: bool = True, init_seed: int | None = None
) -> tuple[nn.Module, str]:
    """Return the backbone with its classifier replaced by Identity, and an identity string for its weights.

    With `init_seed`, the random init (kept for random-init runs, overwritten by loaded weights) draws
    from its own generator seeded with it, so a head-only checkpoint can rebuild the same backbone,
    and the global RNG (the head's init next) does not depend on the backbone. A backbone built
    before in this process from the same key is copied, not built again.
    """
    check_backbone(backbone, weights)
    key = backbone_key(backbone, weights, weights_path, load, init_seed)
    if key is not None and key in _BUILT:
        state, identity = _BUILT[key]
        with torch.device("meta"):  # the module's structure only: no init
            net = torchvision.models.get_model(backbone, weights=None)
        net.fc = nn.Identity()
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
        net = torchvision.models.get_model(backbone, weights=None)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = torchvision.models.get_model(backbone, weights=None)
    identity = "random-init"
    if load and weights_path:
        state = load_state_dict_file(weights_path, "model.weights_path")
        load_backbone_state(net, state, f"model.weights_path {weights_path}", backbone)
        identity = f"file:{Path(weights_path).name}:sha256={sha256_file(weights_path)}"
    elif load and weights:
        state, identity = fetch_torchvision_weights(backbone, weights)
        load_backbone_state(net, state, identity, backbone)
    net.fc = nn.Identity()
    return net, identity


def backbone_state_of(ckpt: Mapping[str, Any], what: str) -> dict[str, torch.Tensor]:
    """The backbone tensors of a head-only checkpoint (see `TransferClassifier.on_save_checkpoint`).

    Rebuilt from the identity it records (torchvision weights, a weights file, or a seeded random
    init) and checked against the sha256 of the tensors it was trained on (the feature cache's key).
    """
    hp, meta = ckpt["hyper_parameters"], ckpt["backbone_identity"]
    try:
        net, _ = build_backbone(
            hp["backbone"], hp.get("weights"), hp.get("weights_path"), init_seed=hp.get("init_seed")
        )
    except FmnistError as e:
        raise FmnistError(f"{what} holds the head only; its backbone cannot be rebuilt: {e}") from e
    check_backbone_sha256(net, meta, what)
    return {f"backbone.{k}": v for k, v in net.state_dict().items()}


def check_backbone_sha256(net: nn.Module, meta: Mapping[str, Any], what: str, sha: str | None = None) -> None:
    sha = sha or module_sha256(net)
    if sha != meta["sha256"]:
        raise FmnistError(
            f"{what} was trained on a backbone with sha256 {meta['sha256'][:16]}... ({meta.get('weights_id')}), "
            f"but the one built here has {sha[:16]}...: the weights file changed, or this torch/torchvision "
            "initialises differently; use the same weights (and versions) as the run that wrote it"
        )


def to_container(x: Any) -> Any:
    """Hydra hands DictConfigs; checkpoints must hold plain containers to load with weights_only=True."""
    if isinstance(x, (DictConfig, ListConfig)):
        return OmegaConf.to_container(x, resolve=True)
    return x


def finetune_options(finetune: Mapping[str, Any] | None) -> dict[str, Any]:
    """model.finetune with defaults filled in, checked, `unfreeze` spelled out as stage names; plain containers."""
    given = to_container(finetune) or {}
    unknown = sorted(set(given) - set(FINETUNE_DEFAULTS))
    if unknown:
        raise FmnistError(
            f"model.finetune.{unknown[0]} is not a fine-tune option; use one of {', '.join(FINETUNE_DEFAULTS)}"
        )
    ft = {**FINETUNE_DEFAULTS, **given}

    def bad(key: str, why: str) -> FmnistError:
        return FmnistError(f"model.finetune.{key}={ft[key]!r} {why}")

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_positive(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    if ft["start_epoch"] is not None and not (is_int(ft["start_epoch"]) and ft["start_epoch"] >= 0):
        raise bad("start_epoch", "must be null (no fine-tune phase) or an integer >= 0 (head-only epochs before it)")
    if ft["init_from"] is not None and not isinstance(ft["init_from"], str):
        raise bad("init_from", "must be null or the path of a checkpoint")
    unfreeze = ft["unfreeze"]
    names = [unfreeze] if isinstance(unfreeze, str) else unfreeze
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise bad("unfreeze", f"must be a list of stage names ({', '.join(RESNET_STAGES)}) or all")
    wrong = [n for n in names if n != "all" and n not in RESNET_STAGES]
    if wrong:
        raise FmnistError(
            f"model.finetune.unfreeze: {wrong[0]} is not a ResNet stage; use names from "
            f"{', '.join(RESNET_STAGES)}, or all"
        )
    # Input-to-output order, no duplicates: the same list on every rank and in every checkpoint.
    ft["unfreeze"] = [s for s in RESNET_STAGES if "all" in names or s in names]
    if not is_positive(ft["backbone_lr_factor"]):
        raise bad("backbone_lr_factor", "must be a positive number (backbone LR = head LR x factor), e.g. 0.1")
    if ft["bn"] not in ("frozen", "train"):
        raise bad("bn", "must be frozen (BatchNorm stays in eval mode) or train")
    if ft["lr"] is not None and not is_positive(ft["lr"]):
        raise bad("lr", "must be null (model.optimizer.lr) or a positive number")
    if not (is_int(ft["warmup_epochs"]) and ft["warmup_epochs"] >= 0):
        raise bad("warmup_epochs", "must be an integer >= 0")
    if ft["schedule"] not in ("cosine", "constant"):
        raise bad("schedule", "must be cosine or constant")
    return ft


def finetune_start_epoch(finetune: Mapping[str, Any] | None) -> int | None:
    """First epoch that trains the backbone, or None for a head-only run.

    `start_epoch` when set; a run that starts from `init_from` fine-tunes from epoch 0. Backbone
    features only stay valid (cacheable) while this is None or not yet reached.
    """
    ft = finetune_options(finetune)
    if ft["start_epoch"] is not None:
        return ft["start_epoch"]
    return 0 if ft["init_from"] else None


def check_finetune(
    finetune: Mapping[str, Any] | None, freeze_backbone: bool, max_epochs: int | None, check_files: bool = True
) -> None:
    """Reject a fine-tune config that cannot run as asked, before anything is built."""
    start = finetune_start_epoch(finetune)
    if start is None:
        return
    if not freeze_backbone:
        raise FmnistError(
            "model.finetune needs model.freeze_backbone=true (false trains the whole backbone from epoch 0); "
            "drop one of the two"
        )
    if max_epochs is not None and start >= max_epochs:
        raise FmnistError(
            f"model.finetune.start_epoch={start} leaves no fine-tune epoch with trainer.max_epochs={max_epochs}; "
            f"raise trainer.max_epochs (fine-tuning runs epochs {start}..max_epochs-1)"
        )
    init_from = finetune_options(finetune)["init_from"]
    if check_files and init_from is not None and not Path(init_from).is_file():
        raise FmnistError(f"model.finetune.init_from={init_from} does not exist; pass a checkpoint from a head run")


def head_phase_factors(scheduler: Mapping[str, Any] | None, epochs: int) -> list[float]:
    """LR multipliers of the head-only epochs of a fine-tune run, from model.scheduler run over those epochs.

    Replaying the configured scheduler on a throw-away optimizer keeps any epoch-based torch scheduler
    usable; the result is a plain list, so the phase schedule below holds no scheduler state of its own.
    """
    if not scheduler or epochs == 0:
        return [1.0] * epochs
    cfg = dict(scheduler)
    target = str(cfg.get("_target_", ""))
    if cfg.pop("interval", "epoch") != "epoch" or target.endswith(("OneCycleLR", "ReduceLROnPlateau")):
        raise FmnistError(
            f"model.scheduler={target.rsplit('.', 1)[-1]} cannot drive the head epochs of a fine-tune run; "
            "use an epoch scheduler (CosineAnnealingLR, StepLR, ...) or model.scheduler=null"
        )
    if target.endswith("CosineAnnealingLR") and cfg.get("T_max") is None:
        cfg["T_max"] = epochs
    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = instantiate(cfg)(probe)
    factors = []
    for _ in range(epochs):
        factors.append(float(probe.param_groups[0]["lr"]))
        probe.step()  # a no-op (no grads); keeps torch from warning that the scheduler stepped first
        schedule.step()
    return factors


def finetune_phase_factor(epoch_in_phase: int, phase_epochs: int, warmup_epochs: int, schedule: str) -> float:
    """The fine-tune phase's own LR multiplier: linear warm-up, then constant or a half cosine that ends above 0."""
    if epoch_in_phase < warmup_epochs:
        return (epoch_in_phase + 1) / (warmup_epochs + 1)
    if schedule == "constant":
        return 1.0
    return cosine_from(epoch_in_phase, warmup_epochs, 1.0, warmup_epochs + max(1, phase_epochs - warmup_epochs))


def cosine_from(epoch: int, start: int, factor: float, end: int, floor: float = 0.0) -> float:
    """A half cosine: `factor` at epoch `start`, `floor` at epoch `end` and after."""
    span = max(1, end - start)
    return floor + (factor - floor) * 0.5 * (1.0 + math.cos(math.pi * min(epoch - start, span) / span))


def schedule_kind(scheduler: Mapping[str, Any] | None, finetune: Mapping[str, Any] | None) -> str | None:
    """Which LR schedule a model config trains with: the fine-tune phase's own, a torch scheduler's name, or None."""
    if finetune_start_epoch(finetune) is not None:
        return "finetune"
    if not scheduler:
        return None
    return str(scheduler.get("_target_", "")).rsplit(".", 1)[-1] or None


class LRPlan:
    """The part of an LR schedule that follows trainer.max_epochs, recorded in every checkpoint.

    `state` is what a checkpoint holds: the scheduler kind, the max_epochs the schedule currently
    ends at, and any re-plans. A resumed run with the checkpoint's max_epochs (an interrupted run)
    keeps the plan, so it trains with exactly the LRs of an uninterrupted run. A resumed run with
    another max_epochs (an extended run) re-plans: a half cosine from the multiplier of the last
    trained epoch down to `floor` at the new end, so the LR goes on from where it was and never
    jumps back up or cycles (a restored CosineAnnealingLR would keep the old T_max and cycle).

    `fresh(epoch, max_epochs)` is the multiplier as first planned, None for schedules that do not
    depend on max_epochs (constant, StepLR, a fixed T_max); those are never re-planned. Up to epoch
    `cosine_start` a fresh plan's multipliers do not depend on max_epochs, so a resume from there
    simply plans afresh for the new end.
    """

    def __init__(
        self,
        kind: str | None,
        max_epochs: int,
        fresh: Callable[[int, int], float] | None = None,
        floor: float = 0.0,
        cosine_start: float = 0,
        total_steps: int | None = None,
    ) -> None:
        self.fresh, self.floor, self.cosine_start = fresh, floor, cosine_start
        self.state: dict[str, Any] = {
            "scheduler": kind,
            "max_epochs": max_epochs,
            "first_max_epochs": max_epochs,
            "replans": [],
            "total_steps": total_steps,
        }

    def factor(self, epoch: int) -> float:
        for start, factor, end in reversed(self.state["replans"]):
            if epoch >= start:
                return cosine_from(epoch, start, factor, end, self.floor)
        return self.fresh(epoch, self.state["first_max_epochs"])

    def adopt(self, saved: Mapping[str, Any] | None, epoch: int, max_epochs: int) -> int | None:
        """Continue the checkpoint's plan from `epoch`; re-plan it to end at `max_epochs` when that
        changed. Returns the checkpoint's max_epochs when it re-planned, else None."""
        if saved is None:  # a fresh run
            return None
        self.state = {**self.state, **dict(saved), "replans": [list(r) for r in saved.get("replans", [])]}
        planned = int(self.state["max_epochs"])
        if planned == max_epochs or epoch >= max_epochs:
            return None
        self.state["max_epochs"] = max_epochs
        if self.fresh is None:
            return planned
        last_trained = max(epoch - 1, 0)
        if not self.state["replans"] and last_trained <= self.cosine_start:
            self.state["first_max_epochs"] = max_epochs
        else:
            self.state["replans"].append([last_trained, self.factor(last_trained), max_epochs])
        return planned


def legacy_lr_plan(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plan of a checkpoint written before checkpoints recorded one, where its scheduler state tells.

    Such a checkpoint's default cosine is a CosineAnnealingLR state; the LambdaLR that now runs that
    schedule loads it once it has LambdaLR's one extra key.
    """
    states = checkpoint.get("lr_schedulers") or []
    if len(states) != 1 or "T_max" not in states[0]:
        return None
    states[0].setdefault("lr_lambdas", [None] * len(states[0].get("base_lrs", [])))
    t_max = int(states[0]["T_max"])
    return {"scheduler": "CosineAnnealingLR", "max_epochs": t_max, "first_max_epochs": t_max, "replans": []}


class TransferClassifier(L.LightningModule):
    def __init__(
        self,
        backbone: str = "resnet50",
        weights: str | None = "IMAGENET1K_V1",
        weights_path: str | None = None,
        num_classes: int = 10,
        head: dict | None = None,
        freeze_backbone: bool = True,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        channels_last: bool = True,
        finetune: dict | None = None,
        load_weights: bool = True,
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        head, optimizer, scheduler = to_container(head) or {}, to_container(optimizer), to_container(scheduler)
        mean, std = list(to_container(mean)), list(to_container(std))
        self.finetune = finetune_options(finetune)
        # First epoch that trains the backbone stages in finetune.unfreeze; None: the backbone never trains.
        self.finetune_start = finetune_start_epoch(self.finetune)
        # No file check: a model rebuilt from its checkpoint (load_weights=False) never reads init_from.
        check_finetune(self.finetune, freeze_backbone, max_epochs=None, check_files=False)
        self.save_hyperparameters(
            {
                "backbone": backbone,
                "weights": weights,
                "weights_path": weights_path,
                "num_classes": num_classes,
                "head": head,
                "freeze_backbone": freeze_backbone,
                "optimizer": optimizer or DEFAULT_OPTIMIZER,
                "scheduler": scheduler,
                "image_size": image_size,
                "mean": mean,
                "std": std,
                "channels_last": channels_last,
                "finetune": self.finetune,
                "init_seed": init_seed,
            }
        )
        init_from = self.finetune["init_from"] if load_weights else None
        # Weights from init_from replace the backbone's anyway: no need to fetch ImageNet weights first.
        load = load_weights and not init_from
        self.backbone, self.weights_id = build_backbone(backbone, weights, weights_path, load, init_seed)
        self._backbone_key = backbone_key(backbone, weights, weights_path, load, init_seed)
        self.feature_dim = BACKBONES[backbone]
        self.head = self._build_head(
            self.feature_dim, num_classes, head.get("hidden_dims", [256]), head.get("dropout", 0.5)
        )
        # Preprocessing lives with the model too, so predict/export rebuild it from the checkpoint alone.
        self.preprocess = ImagePreprocess(image_size, mean, std)
        if init_from:
            self._load_init_from(init_from)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        for stage in self.finetune_stages:
            # Trainable from the start, so DDP registers the same parameter set on every rank for the
            # whole run; before finetune_start they get no gradient (embed) and an LR of 0 (optimizer).
            stage.requires_grad_(True)
        self._finetune_announced = False
        self.lr_plan: LRPlan | None = None  # set by configure_optimizers
        self._saved_lr_plan: dict[str, Any] | None = None  # the resumed checkpoint's
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # validate_args=False: labels are checked once when the IDX files load; the per-step
        # checks (torch.unique on the targets) force a GPU sync on every step.
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro", validate_args=False),
                "f1": MulticlassF1Score(num_classes, average="macro", validate_args=False),
            }
        )
        self.train()  # apply the BatchNorm policy from the start, not only after a train() call
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # The epoch mean of the train loss, logged in on_train_epoch_end. nan_strategy="disable": its NaN
        # check syncs a GPU every step, and a non-finite loss is caught in _step anyway.
        self.train_loss = MeanMetric(nan_strategy="disable")
        # On CUDA, per-step work that needs a host round trip is deferred to the epoch's end: the
        # non-finite-loss count, and metric updates (torchmetrics' bincount reads the max back).
        self._nonfinite_steps: torch.Tensor | None = None
        self._deferred: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @staticmethod
    def _build_head(in_dim: int, num_classes: int, hidden_dims: Sequence[int], dropout: float) -> nn.Sequential:
        layers: list[nn.Module] = []
        for width in hidden_dims:
            layers += [nn.Linear(in_dim, int(width)), nn.ReLU(inplace=True), nn.Dropout(float(dropout))]
            in_dim = int(width)
        layers.append(nn.Linear(in_dim, num_classes))
        return nn.Sequential(*layers)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TransferClassifier:
        """Rebuild from our own checkpoint: config from its hyper-parameters, tensors via weights_only=True."""
        ckpt = read_checkpoint(path, map_location=map_location)
        if "backbone_identity" not in ckpt:
            model = cls(**ckpt["hyper_parameters"], load_weights=False)
        else:  # head only: the backbone is rebuilt from the weights it names, then checked
            try:
                model = cls(**ckpt["hyper_parameters"], load_weights=True)
            except FmnistError as e:
                raise FmnistError(f"checkpoint {path} holds the head only; its backbone cannot be rebuilt: {e}") from e
            check_backbone_sha256(model.backbone, ckpt["backbone_identity"], f"checkpoint {path}")
            ckpt["state_dict"].update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
        model.load_state_dict(ckpt["state_dict"])
        model.weights_id = ckpt.get("weights_id", model.weights_id)
        return model.eval()

    def _load_init_from(self, path: str) -> None:
        """Start from a head-trained checkpoint: its tensors into this model, built from the current config."""
        ckpt = read_checkpoint(path, "model.finetune.init_from")
        theirs_hp, ours_hp = ckpt["hyper_parameters"], self.hparams

        def arch(hp: Mapping[str, Any]) -> dict[str, Any]:
            hidden = (hp.get("head") or {}).get("hidden_dims", [256])
            return {
                "backbone": hp.get("backbone"),
                "head.hidden_dims": [int(w) for w in hidden],
                "num_classes": hp.get("num_classes"),
            }

        theirs, ours = arch(theirs_hp), arch(ours_hp)
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
        mismatch = state_mismatch(self.state_dict(), ckpt["state_dict"])
        if mismatch:
            raise FmnistError(f"model.finetune.init_from={path} does not fit this model: {mismatch}")
        self.load_state_dict(ckpt["state_dict"], strict=True)
        origin = ckpt.get("weights_id", "unknown")
        self.weights_id = f"init_from:{Path(path).name}:sha256={sha256_file(path)} (from {origin})"
        log.info("Initialised from %s", path)

    @property
    def finetune_stages(self) -> list[nn.Module]:
        """The backbone stages a fine-tune phase trains (empty for a head-only run)."""
        if self.finetune_start is None:
            return []
        return [self.backbone.get_submodule(name) for name in self.finetune["unfreeze"]]

    @property
    def finetune_active(self) -> bool:
        """True from epoch `finetune_start` on: the unfrozen stages get gradients, BN follows finetune.bn."""
        return self.finetune_start is not None and self.current_epoch >= self.finetune_start

    @property
    def backbone_frozen_for_good(self) -> bool:
        """True when no epoch of this run trains the backbone: its checkpoints then hold the head only."""
        return self.freeze_backbone and self.finetune_start is None

    @property
    def backbone_sha256(self) -> str:
        """sha256 of the backbone's tensors (the feature cache's key); computed once per process and
        weights while the backbone cannot change (see `_BUILT`)."""
        key = self._backbone_key if self.backbone_frozen_for_good else None
        if key is None or key not in _SHA256:
            sha = module_sha256(self.backbone)
            if key is None:
                return sha
            _SHA256.clear()
            _SHA256[key] = sha
        return _SHA256[key]

    @property
    def head_only_checkpoints(self) -> bool:
        """Frozen for good and rebuildable from its identity: named weights, a weights file or a seeded init."""
        hp = self.hparams
        rebuildable = bool(hp.get("weights") or hp.get("weights_path")) or hp.get("init_seed") is not None
        return self.backbone_frozen_for_good and rebuildable

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["weights_id"] = self.weights_id
        if self.lr_plan is not None:
            checkpoint["lr_plan"] = self.lr_plan.state
        if self.head_only_checkpoints:
            # The frozen backbone is ~94 MB of a ResNet50 checkpoint's 94 and never changes: keep its
            # identity instead (what rebuilds it, and the sha256 that proves the rebuild).
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("backbone.")]:
                del state[key]
            checkpoint["backbone_identity"] = {"weights_id": self.weights_id, "sha256": self.backbone_sha256}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.weights_id = checkpoint.get("weights_id", self.weights_id)
        self._saved_lr_plan = checkpoint.get("lr_plan") or legacy_lr_plan(checkpoint)
        meta = checkpoint.get("backbone_identity")
        if meta is None:
            return
        # Head only: this model's backbone when it is the one the checkpoint was trained on (a resumed
        # head run), else the one its identity rebuilds (a fine-tune run resumed from a head checkpoint).
        if self.backbone_sha256 == meta["sha256"]:
            checkpoint["state_dict"].update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        else:
            checkpoint["state_dict"].update(backbone_state_of(checkpoint, "the checkpoint"))

    def on_train_start(self) -> None:
        """Take over a resumed checkpoint's LR plan (re-planned when trainer.max_epochs changed) and
        set this epoch's LRs from it."""
        plan, saved, self._saved_lr_plan = self.lr_plan, self._saved_lr_plan, None
        if plan is None:
            return
        epoch, end = self.trainer.current_epoch, max(1, int(self.trainer.max_epochs or 1))
        planned = plan.adopt(saved, epoch, end)
        schedulers = self.trainer.lr_scheduler_configs
        if plan.fresh is not None and schedulers:
            scheduler = schedulers[0].scheduler
            scheduler.last_epoch = epoch
            for group, base, fn in zip(
                scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base * fn(epoch)
            scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        if planned is not None and self.trainer.is_global_zero:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            how = (
                f"the LR schedule is re-planned: from lr {lr:.3g} at epoch {epoch} down to the end of its cosine "
                f"at epoch {end}"
                if plan.fresh is not None
                else f"the LR schedule ({plan.state['scheduler'] or 'constant'}) does not depend on it"
            )
            log.info(
                "%s the run from trainer.max_epochs=%d (as the checkpoint planned) to %d: %s",
                "Extending" if end > planned else "Shortening",
                planned,
                end,
                how,
            )

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if self.freeze_backbone:
            # requires_grad=False alone still lets BatchNorm update its running stats in train mode.
            self.backbone.eval()
            if mode and self.finetune["bn"] == "train" and self.finetune_active:
                # Only the unfrozen stages' BatchNorm updates its stats; everything below stays as loaded.
                for stage in self.finetune_stages:
                    stage.train()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning restores per-module train/eval flags around validation without calling train(),
        # so enforce the BatchNorm policy here as well (it also changes at the fine-tune epoch).
        self.train(True)
        if self.finetune_active and not self._finetune_announced:
            self._finetune_announced = True
            if self.trainer.is_global_zero:
                lrs = {g.get("name"): g["lr"] for g in self.trainer.optimizers[0].param_groups}
                log.info(
                    "Fine-tune phase from epoch %d (now %d): training backbone %s at lr %.3g (head %.3g), "
                    "BatchNorm %s; backbone features change from here on, so no cached features are used",
                    self.finetune_start,
                    self.current_epoch,
                    "+".join(self.finetune["unfreeze"]),
                    lrs.get("backbone", float("nan")),
                    lrs.get("head", float("nan")),
                    self.finetune["bn"],
                )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, (B, 2048) for resnet50, from preprocessed images."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.training and self.finetune_start is not None and not self.finetune_active and torch.is_grad_enabled():
            # Head-only epochs of a fine-tune run: the stages to unfreeze already require grad (for DDP),
            # but must not get any yet; no_grad also skips their backward. (Eval, export: never here.)
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        features = holds_features(x)  # cached backbone features, else preprocessed images
        if features and self.finetune_active:
            raise FmnistError(
                f"cached backbone features reached the model in its fine-tune phase (epoch {self.current_epoch}); "
                "they are stale once the backbone trains: turn the feature cache off for fine-tune runs"
            )
        return self.head(x.to(self.head[0].weight.dtype)) if features else self(x)

    def _step(self, batch, metrics: MetricCollection, stage: str, batch_idx: int = 0) -> torch.Tensor:
        x, y = batch
        logits = self.logits(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        on_cuda = loss.device.type == "cuda"
        if stage == "train" and on_cuda:
            bad = (~torch.isfinite(loss)).int()
            self._nonfinite_steps = bad if self._nonfinite_steps is None else self._nonfinite_steps + bad
        elif stage == "train" and not torch.isfinite(loss):
            raise FmnistError(
                f"training diverged: loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "lower model.optimizer.lr"
            )
        if on_cuda:
            self._deferred.setdefault(stage, []).append((logits.detach().argmax(1), y))
        else:
            metrics.update(logits.detach().float(), y)
        if stage != "train":
            self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=len(y), sync_dist=True)
            return loss
        # self.log costs ~0.7 ms, a quarter of a head step on cached features; loggers only write
        # every log_every_n_steps anyway, so the step loss is logged on those steps only.
        self.train_loss.update(loss.detach())
        if batch_idx % getattr(self._trainer, "log_every_n_steps", 1) == 0:
            # Not on a GPU's progress bar: the bar reads it back (a host sync) at every refresh.
            self.log("train/loss_step", loss, prog_bar=not on_cuda, batch_size=len(y))
        return loss

    def _log_epoch_metrics(self, metrics: MetricCollection, stage: str) -> None:
        deferred = self._deferred.pop(stage, None)
        if deferred:  # CUDA: one update with the epoch's predictions (class indices) instead of one per step
            metrics.update(torch.cat([p for p, _ in deferred]), torch.cat([t for _, t in deferred]))
        # Computed once per epoch here rather than passed to log_dict on every step: Lightning's
        # per-step handling of Metric objects was ~1/3 of a head step on cached features.
        # compute() syncs the metric states across DDP ranks.
        self.log_dict(metrics.compute(), prog_bar=stage != "test")
        metrics.reset()

    def on_train_epoch_end(self) -> None:
        bad, self._nonfinite_steps = self._nonfinite_steps, None
        if bad is not None and int(bad) > 0:
            raise FmnistError(
                f"training diverged: the loss was not finite in {int(bad)} steps of epoch {self.current_epoch}; "
                "lower model.optimizer.lr"
            )
        self.log("train/loss_epoch", self.train_loss.compute(), prog_bar=True)
        self.train_loss.reset()
        self._log_epoch_metrics(self.train_metrics, "train")

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, self.train_metrics, "train", batch_idx)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        # Refuse to go on (and so to save last.ckpt) once the weights are no longer finite:
        # ModelCheckpoint saves after this hook, so a diverged model never becomes `last`.
        self._log_epoch_metrics(self.val_metrics, "val")
        if self.trainer.sanity_checking:
            return
        bad = [n for n, p in self.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise FmnistError(
                f"training diverged: parameter {bad[0]} is not finite after epoch {self.current_epoch}; "
                "lower model.optimizer.lr"
            )

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.logits(x).float().softmax(-1)

    def configure_optimizers(self) -> Any:
        if self.finetune_start is not None:
            return self._configure_finetune_optimizers()
        params = [p for p in self.parameters() if p.requires_grad]
        opt_cfg = dict(self.hparams.optimizer)
        optimizer = instantiate(opt_cfg)(params)
        max_epochs = max(1, int(self.trainer.max_epochs or 1))
        kind = schedule_kind(self.hparams.scheduler, None)
        self.lr_plan = LRPlan(kind, max_epochs)
        if not self.hparams.scheduler:
            return optimizer
        sched_cfg = dict(self.hparams.scheduler)
        interval = sched_cfg.pop("interval", "epoch")
        if kind == "OneCycleLR":
            sched_cfg.setdefault("max_lr", opt_cfg["lr"])
            sched_cfg.setdefault("total_steps", int(self.trainer.estimated_stepping_batches))
            self.lr_plan.state["total_steps"] = sched_cfg["total_steps"]
            interval = "step"
        elif kind == "CosineAnnealingLR" and sched_cfg.get("T_max") is None and interval == "epoch":
            # CosineAnnealingLR over trainer.max_epochs, as a function of the epoch that a resumed
            # run can re-plan (see LRPlan); the same LRs as torch's closed form.
            floor = float(sched_cfg.get("eta_min", 0.0)) / float(opt_cfg["lr"])
            plan = self.lr_plan = LRPlan(
                kind, max_epochs, lambda epoch, end: cosine_from(epoch, 0, 1.0, end, floor), floor
            )
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: plan.factor(epoch))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
        scheduler = instantiate(sched_cfg)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def _configure_finetune_optimizers(self) -> Any:
        """Both param groups from the first step, the backbone's at LR 0 until finetune_start.

        Adding a group at the unfreeze epoch breaks resuming (the saved optimizer has more groups than
        the rebuilt one, Lightning issues 6891/8502) and DDP (which fixes its parameter set when it
        wraps the model, issue 20340); a fixed set of groups with a phase-aware LR avoids both.
        """
        ft, start = self.finetune, int(self.finetune_start)
        opt_cfg = dict(self.hparams.optimizer)
        head_lr = float(opt_cfg["lr"])
        phase_head_lr = float(ft["lr"] or head_lr)
        groups = [
            {"params": list(self.head.parameters()), "name": "head"},
            {
                "params": [p for stage in self.finetune_stages for p in stage.parameters()],
                "lr": phase_head_lr * ft["backbone_lr_factor"],
                "name": "backbone",
            },
        ]
        optimizer = instantiate(opt_cfg)(groups)
        head_factors = head_phase_factors(self.hparams.scheduler, start)
        warmup, schedule = ft["warmup_epochs"], ft["schedule"]

        def fresh(epoch: int, max_epochs: int) -> float:
            return finetune_phase_factor(epoch - start, max(1, max_epochs - start), warmup, schedule)

        # The phase's multiplier follows trainer.max_epochs: a resumed run with another max_epochs
        # re-plans it (LRPlan). Its cosine starts after the warm-up; a constant one never depends on it.
        plan = self.lr_plan = LRPlan(
            "finetune",
            max(start + 1, int(self.trainer.max_epochs or start + 1)),
            fresh,
            cosine_start=start + warmup if schedule == "cosine" else math.inf,
        )

        # Plain functions: LambdaLR leaves them out of its state_dict, so checkpoints hold only numbers
        # (the plan goes into the checkpoint as lr_plan), and a resumed run rebuilds the same schedule.
        def head_lambda(epoch: int) -> float:
            return head_factors[epoch] if epoch < start else phase_head_lr / head_lr * plan.factor(epoch)

        def backbone_lambda(epoch: int) -> float:
            return 0.0 if epoch < start else plan.factor(epoch)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [head_lambda, backbone_lambda])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
