"""What a TransferClassifier was trained on, carried in its hyper-parameters and so in every checkpoint.

`class_names` (the classes the head's outputs stand for, in order) and `input_spec` (the uint8 images
the datamodule served: {"kind": "fashion_mnist"|"image_folder", "channels", "height", "width"}) are
taken from the trainer's datamodule in `setup` by a fresh model, and checked against it by a model
from a checkpoint. The report, `predict` and `export` read them from the checkpoint. A checkpoint
written before they travelled in it reads as Fashion-MNIST.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torchvision.datasets import FashionMNIST

from fmnist_tl.core import FmnistError

log = logging.getLogger(__name__)

# What a model that has not seen a datamodule, and a checkpoint written before class names and the
# input spec travelled in it, were trained on: Fashion-MNIST (FashionMNISTDataModule's own values).
FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = tuple(FashionMNIST.classes)
FASHION_MNIST_INPUT_SPEC: dict[str, Any] = {"kind": "fashion_mnist", "channels": 1, "height": 28, "width": 28}


def checked_identity(
    class_names: Sequence[str] | None, input_spec: Mapping[str, Any] | None, num_classes: int
) -> tuple[list[str] | None, dict[str, Any] | None]:
    """The constructor's class_names and input_spec as plain containers (checkpoints load with
    weights_only=True); None until a datamodule gives them."""
    names = None if class_names is None else [str(c) for c in class_names]
    if names is not None and len(names) != num_classes:
        raise FmnistError(f"model.num_classes={num_classes} but {len(names)} class names were given")
    return names, None if input_spec is None else dict(input_spec)


def with_legacy_identity(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyper-parameters; one written before class names travelled in it gets Fashion-MNIST's."""
    hparams = dict(hparams)
    if "class_names" not in hparams and hparams.get("num_classes") == len(FASHION_MNIST_CLASS_NAMES):
        hparams.update(class_names=list(FASHION_MNIST_CLASS_NAMES), input_spec=dict(FASHION_MNIST_INPUT_SPEC))
    return hparams


def check_resumed(checkpoint: Mapping[str, Any], class_names: Sequence[str]) -> None:
    """A run resumed from `checkpoint` must train on the classes it was trained on."""
    saved = checkpoint.get("hyper_parameters", {}).get("class_names") or list(FASHION_MNIST_CLASS_NAMES)
    if list(saved) != list(class_names):
        raise FmnistError(
            f"the checkpoint was trained on classes ({', '.join(saved)}), this run's data has "
            f"({', '.join(class_names)}): resume with the data it was trained on"
        )


def data_identity(datamodule: Any) -> tuple[list[str], dict[str, Any] | None]:
    """A datamodule's class names and input spec (None: it has no input_spec, as Fashion-MNIST's had not)."""
    spec = datamodule.input_spec() if hasattr(datamodule, "input_spec") else None
    return [str(c) for c in datamodule.class_names], None if spec is None else dict(spec)


def describe_input(spec: Mapping[str, Any]) -> str:
    """'image_folder 3x160x160': an input spec in words, for messages."""
    return f"{spec['kind']} {spec['channels']}x{spec['height']}x{spec['width']}"


class TrainedOn:
    """TransferClassifier's class names and input spec: read from its hparams, taken from or checked
    against the trainer's datamodule in `setup`."""

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes the head's outputs stand for, in order (Fashion-MNIST's until a datamodule gives them)."""
        names = self.hparams.get("class_names")
        return FASHION_MNIST_CLASS_NAMES if names is None else tuple(names)

    @property
    def input_spec(self) -> dict[str, Any]:
        """The uint8 images the model was trained on: {"kind", "channels", "height", "width"} (Fashion-MNIST's
        until a datamodule gives them). `predict` loads images, and `export` shapes its input, by it."""
        spec = self.hparams.get("input_spec")
        return dict(FASHION_MNIST_INPUT_SPEC if spec is None else spec)

    def setup(self, stage: str) -> None:
        """Take the class names and input spec from the trainer's datamodule (a fresh model), or check that
        the datamodule holds the data this model was trained on (a model from a checkpoint)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(datamodule, "class_names", None) is None:
            return
        if self.hparams.get("class_names") is None:
            self._adopt_classes(*data_identity(datamodule))
        else:
            self.check_data(datamodule)

    def _adopt_classes(self, names: list[str], spec: dict[str, Any] | None) -> None:
        if len(names) != self.hparams.num_classes:
            if self.finetune.init_from:
                raise FmnistError(
                    f"model.finetune.init_from={self.finetune.init_from} has a head for {self.hparams.num_classes} "
                    f"classes, the data {len(names)}: fine-tune from a checkpoint trained on this data"
                )
            # model.num_classes is Fashion-MNIST's 10 unless set: the data's classes decide. Nothing has
            # trained or restored the head yet (setup comes before checkpoint loading and the optimizer).
            log.info("head: %d classes, from the data (model.num_classes=%d)", len(names), self.hparams.num_classes)
            old = self.head[-1]
            self.head[-1] = nn.Linear(old.in_features, len(names)).to(old.weight.device, old.weight.dtype)
            self.metrics = type(self.metrics)(len(names))  # StageMetrics for the new class count
            self.hparams.num_classes = len(names)
        self.hparams.class_names = names
        if spec is not None:
            self.hparams.input_spec = spec

    def check_data(self, datamodule: Any) -> None:
        """Raise FmnistError unless `datamodule` holds the classes (and kind of images) this model was trained on."""
        names, spec = data_identity(datamodule)
        ours = list(self.class_names)
        if names != ours:
            raise FmnistError(
                f"the model was trained on {len(ours)} classes ({', '.join(ours)}), the data has {len(names)} "
                f"({', '.join(names)}): use the data config it was trained with"
                + (" (data=image_folder data.root=...)" if self.input_spec["kind"] == "image_folder" else "")
            )
        trained = self.input_spec
        if spec is None:
            return
        if (spec["kind"], spec["channels"]) != (trained["kind"], trained["channels"]):
            raise FmnistError(
                f"the model was trained on {describe_input(trained)} images, the data holds {describe_input(spec)}: "
                "use the data config it was trained with"
            )
        if (spec["height"], spec["width"]) != (trained["height"], trained["width"]):
            log.warning(
                "the data's images are %dx%d, the model was trained on %dx%d: its preprocessing resizes them, "
                "but the numbers can differ from a run at the trained size (data.stored_size)",
                spec["height"],
                spec["width"],
                trained["height"],
                trained["width"],
            )
