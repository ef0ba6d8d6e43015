"""fmnist_tl: Fashion-MNIST by transfer learning from an ImageNet-pretrained ResNet50."""

__version__ = "0.1.0"
