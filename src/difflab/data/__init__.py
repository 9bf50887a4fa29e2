"""Training data: image folders and Fashion-MNIST as uint8 tensors, plus augmentation.

- :mod:`difflab.data.decode`: decode one image file (the decoding rules) and resize it.
- :mod:`difflab.data.images`: find, decode (in parallel) and cache a folder of images.
- :mod:`difflab.data.fashion_mnist`: the built-in data set (found locally or downloaded).
- :mod:`difflab.data.augment`: random flips, rotations and colour jitter in torch
  (``from difflab.data.augment import augment``: the function is deliberately not re-exported
  here, where its name would hide the submodule ``difflab.data.augment``).
- :mod:`difflab.data.dataset`: ``load_dataset(spec, image_size)`` and the uint8 <-> [-1, 1] helpers.
- :mod:`difflab.data.paired`: paired folders for segmentation (images, class-index masks, classes.txt):
  ``load_pairs``, ``split_pairs``, ``joint_augment``, mask files and pictures.
"""
from difflab.data.augment import AugmentConfig
from difflab.data.dataset import BUILTIN_DATASETS, ImageData, load_dataset, to_float, to_uint8
from difflab.data.decode import BadImageError, open_image, resize_center_crop
from difflab.data.fashion_mnist import load_fashion_mnist
from difflab.data.images import (
    IMAGE_EXTENSIONS,
    FolderImages,
    find_images,
    load_folder,
)

__all__ = [
    "AugmentConfig",
    "BUILTIN_DATASETS",
    "BadImageError",
    "FolderImages",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "find_images",
    "load_dataset",
    "load_fashion_mnist",
    "load_folder",
    "open_image",
    "resize_center_crop",
    "to_float",
    "to_uint8",
]
