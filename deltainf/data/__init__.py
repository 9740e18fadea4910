"""Datasets: the embedded digits default, CIFAR-10/100 and image-folder loaders, synthetic data.

All datasets are :class:`ImageDataset` objects: float32 images (N, C, H, W) in pixel space [0, 1],
int64 labels (N,), items ``(x, y, index)``. Nothing is ever downloaded.
"""
from deltainf.data.cifar import (CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                 load_cifar10, load_cifar100)
from deltainf.data.dataset import ImageDataset, as_index_tensor
from deltainf.data.digits import DIGITS_CLASSES, load_digits_dataset
from deltainf.data.imagefolder import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, load_image_folder
from deltainf.data.loaders import DATASET_SPECS, check_dataset, make_loader, parse_dataset_spec, unpack_batch
from deltainf.data.synthetic import make_synthetic_dataset

__all__ = [
    "ImageDataset", "as_index_tensor",
    "load_digits_dataset", "DIGITS_CLASSES",
    "load_cifar10", "load_cifar100", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "CIFAR10_CLASSES",
    "load_image_folder", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS",
    "make_synthetic_dataset",
    "make_loader", "parse_dataset_spec", "DATASET_SPECS", "unpack_batch", "check_dataset",
]
