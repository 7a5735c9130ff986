"""Datasets with stable example ids and recorded label noise."""
from .core import GROUPS, Dataset, from_arrays, from_torch
from .noise import inject_label_noise
from .sources import DATASETS, load_cifar10, load_dataset, load_digits, load_mnist1d

__all__ = ["GROUPS", "Dataset", "from_arrays", "from_torch", "inject_label_noise", "DATASETS", "load_dataset", "load_mnist1d",
           "load_digits", "load_cifar10"]
