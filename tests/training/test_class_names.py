"""Class names and the input spec travel in the checkpoint; a checkpoint without them reads as Fashion-MNIST."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from torchvision.datasets import FashionMNIST

from fmnist_tl.core.errors import FmnistError
from fmnist_tl.data.fashion_mnist import FashionMNISTDataModule
from fmnist_tl.training.model import TransferClassifier
from tests.colour_data import CLASS_NAMES, SIZE, ColourData, colour_images
from tests.helpers import tiny_split

FASHION_SPEC = {"kind": "fashion_mnist", "channels": 1, "height": 28, "width": 28}
COLOUR_SPEC = {"kind": "image_folder", "channels": 3, "height": SIZE, "width": SIZE}


@pytest.fixture(scope="module")
def fashion_checkpoint(trained_run) -> str:
    return json.loads((trained_run / "metrics.json").read_text())["best_model_path"]


def logits(model: TransferClassifier, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(model.preprocess(images))


def test_a_run_takes_class_names_input_spec_and_class_count_from_its_datamodule(colour_checkpoint):
    saved = torch.load(colour_checkpoint, weights_only=True)["hyper_parameters"]
    # model.num_classes was left at 10: the 3 class folders decide.
    assert saved["class_names"] == list(CLASS_NAMES) and saved["num_classes"] == 3
    assert saved["input_spec"] == COLOUR_SPEC
    model = TransferClassifier.from_checkpoint(colour_checkpoint)
    assert model.class_names == CLASS_NAMES and model.input_spec == COLOUR_SPEC
    assert logits(model, colour_images(4, 5)[0]).shape == (4, 3)


def test_a_fashion_mnist_run_records_fashion_mnist(fashion_checkpoint):
    saved = torch.load(fashion_checkpoint, weights_only=True)["hyper_parameters"]
    assert saved["class_names"] == list(FashionMNIST.classes)
    # None where the datamodule has no input_spec() (it reads as Fashion-MNIST's), else its own.
    assert saved.get("input_spec") in (None, FASHION_SPEC)
    assert TransferClassifier.from_checkpoint(fashion_checkpoint).input_spec == FASHION_SPEC


def test_a_checkpoint_without_class_names_reads_as_fashion_mnist(fashion_checkpoint, tmp_path):
    ckpt = torch.load(fashion_checkpoint, weights_only=True)
    for key in ("class_names", "input_spec"):
        del ckpt["hyper_parameters"][key]
    old = tmp_path / "before_class_names.ckpt"
    torch.save(ckpt, old)
    model = TransferClassifier.from_checkpoint(old)
    assert model.class_names == tuple(FashionMNIST.classes) and model.input_spec == FASHION_SPEC
    images = tiny_split(5, 11)[0].unsqueeze(1)
    assert torch.equal(logits(model, images), logits(TransferClassifier.from_checkpoint(fashion_checkpoint), images))
    model.check_data(FashionMNISTDataModule())  # it is evaluated on Fashion-MNIST without complaint


def test_a_trained_model_refuses_data_with_other_classes(colour_checkpoint, fashion_checkpoint):
    colour = TransferClassifier.from_checkpoint(colour_checkpoint)
    message = "the model was trained on 3 classes (red apple, green leaf, blue sky), the data has 10 (T-shirt/top"
    with pytest.raises(FmnistError, match=re.escape(message)) as e:
        colour.check_data(FashionMNISTDataModule())
    assert str(e.value).endswith("use the data config it was trained with (data=image_folder data.root=...)")
    with pytest.raises(FmnistError, match=re.escape("the data has 3 (red apple, green leaf, blue sky)")):
        TransferClassifier.from_checkpoint(fashion_checkpoint).check_data(ColourData())


def test_a_trained_model_refuses_other_kinds_of_images_and_warns_about_other_sizes(colour_checkpoint, caplog):
    model = TransferClassifier.from_checkpoint(colour_checkpoint)

    class GreyData(ColourData):
        def input_spec(self) -> dict:
            return {**super().input_spec(), "kind": "fashion_mnist", "channels": 1}

    with pytest.raises(FmnistError, match=re.escape("trained on image_folder 3x20x20 images, the data holds")):
        model.check_data(GreyData())
    with caplog.at_level(logging.WARNING):
        model.check_data(ColourData(size=SIZE + 4))
    assert "the data's images are 24x24, the model was trained on 20x20" in caplog.text


def test_resuming_a_run_on_other_classes_is_refused(colour_checkpoint):
    fresh = TransferClassifier(backbone="resnet18", weights=None, image_size=32)  # Fashion-MNIST until set up
    with pytest.raises(FmnistError, match=re.escape("the checkpoint was trained on classes (red apple, green leaf")):
        fresh.on_load_checkpoint(torch.load(colour_checkpoint, weights_only=True))


def test_class_names_that_do_not_fit_num_classes_are_refused():
    with pytest.raises(FmnistError, match=re.escape("model.num_classes=10 but 3 class names were given")):
        TransferClassifier(backbone="resnet18", weights=None, class_names=list(CLASS_NAMES))
