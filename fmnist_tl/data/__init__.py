"""Fashion-MNIST and folders of labelled images as LightningDataModules; any image file as model input."""

from fmnist_tl.data.fashion_mnist import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FashionMNISTDataModule,
    ImagePreprocess,
    holds_features,
)
from fmnist_tl.data.image_folder import ImageFolderDataModule
from fmnist_tl.data.images import BadImage, expand_inputs, load_image, load_rgb
from fmnist_tl.data.splits import SplitsDataModule

__all__ = [
    "BadImage",
    "expand_inputs",
    "FashionMNISTDataModule",
    "holds_features",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderDataModule",
    "ImagePreprocess",
    "load_image",
    "load_rgb",
    "SplitsDataModule",
]
