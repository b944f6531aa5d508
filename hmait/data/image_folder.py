"""The ImageNet folder layout as training reads it: which files are images, and the order of classes.

Training's :class:`hmait.engine.dataset.ImageFolderDataset` and inference (:mod:`hmait.predict`)
both take these from here, so a class index means the same folder in both. This module imports
nothing beyond the standard library: inference must not pull in the training package.
"""
from __future__ import annotations

import os

IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff')


def is_image_name(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS`, in any case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_folder_names(split_dir: str) -> list[str]:
    """The class folders of ``split_dir`` (``data_root/train``) in label order: class i is the i-th.

    Plain sorted names, hidden folders skipped, as torchvision's ``ImageFolder`` orders them (timm's
    folder reader sorts numbers inside names naturally instead, which can differ: ``c10`` < ``c2`` here).
    """
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))
