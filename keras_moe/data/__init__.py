"""Dataset loaders and augmentation for the examples and benchmarks."""

from keras_moe.data.augmentation import cifar_augmentation
from keras_moe.data.augmentation import normalization
from keras_moe.data.datasets import CITYSCAPES_IGNORE_LABEL
from keras_moe.data.datasets import DATASETS
from keras_moe.data.datasets import ArrayBatches
from keras_moe.data.datasets import DatasetInfo
from keras_moe.data.datasets import DatasetNotAvailableError
from keras_moe.data.datasets import load_cifar10
from keras_moe.data.datasets import load_cifar100
from keras_moe.data.datasets import load_dataset
from keras_moe.data.patch_digits import load_mnist
from keras_moe.data.patch_digits import make_patch_digits

__all__ = [
    "ArrayBatches",
    "CITYSCAPES_IGNORE_LABEL",
    "DATASETS",
    "DatasetInfo",
    "DatasetNotAvailableError",
    "cifar_augmentation",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_mnist",
    "make_patch_digits",
    "normalization",
]
