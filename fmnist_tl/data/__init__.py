"""Fashion-MNIST as a LightningDataModule, its IDX files, and any image file turned into model input."""

from fmnist_tl.data.fashion_mnist import (
    CLASS_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FashionMNISTDataModule,
    ImagePreprocess,
    holds_features,
)
from fmnist_tl.data.images import BadImage, expand_inputs, load_image

__all__ = [
    "BadImage",
    "CLASS_NAMES",
    "expand_inputs",
    "FashionMNISTDataModule",
    "holds_features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagePreprocess",
    "load_image",
]
