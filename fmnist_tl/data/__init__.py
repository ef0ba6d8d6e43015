"""Fashion-MNIST as a LightningDataModule, its IDX files, and any image file turned into model input."""

from fmnist_tl.data.fashion_mnist import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FashionMNISTDataModule,
    ImagePreprocess,
    holds_features,
)
from fmnist_tl.data.images import BadImage, expand_inputs, load_image, load_rgb

__all__ = [
    "BadImage",
    "expand_inputs",
    "FashionMNISTDataModule",
    "holds_features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImagePreprocess",
    "load_image",
    "load_rgb",
]
