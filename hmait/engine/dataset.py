"""ImageNet-layout image folders with timm's transforms, and a sampler that makes augmentation resumable."""
from __future__ import annotations

import functools
import multiprocessing
import os
import os.path as osp
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from mmengine.dataset import DefaultSampler
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from torch.utils.data import Dataset
from torchvision.transforms import ToTensor

from ..data.image_folder import IMAGE_EXTENSIONS, class_folder_names, is_image_name

CORRUPT_POLICIES = ('skip', 'error')
# A run of this many unreadable files in a row means the data set is broken, not a few files.
MAX_CONSECUTIVE_CORRUPT = 16


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    if bits_to_keep <= 0:
        # What Pillow < 13 returned for 0 bits (its lookup table masks every bit): a black image.
        return Image.new(img.mode, img.size)
    return timm_auto_augment.posterize(img, bits_to_keep, **kwargs)


@functools.cache
def _pillow_rejects_zero_bit_posterize() -> bool:
    try:
        ImageOps.posterize(Image.new('RGB', (1, 1)), 0)
    except ValueError:
        return True
    return False


def keep_posterize_working(transform: object) -> int:
    """Make the RandAugment / AutoAugment posterize ops inside ``transform`` accept 0 bits.

    timm's increasing-posterize maps magnitude 10 to 0 bits (reached by rand-m9-mstd0.5, whose
    magnitudes are clipped to [0, 10]); Pillow 13 raises on 0 bits instead of returning a black
    image, which would kill a training run at a random iteration. Only the ops of this transform
    are changed (timm's own op table is left alone), only their 0-bit case, and only where the
    installed Pillow rejects it. Returns the number of ops changed.
    """
    if not _pillow_rejects_zero_bit_posterize():
        return 0
    changed, pending, seen = 0, [transform], set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, timm_auto_augment.AugmentOp):
            if node.aug_fn is timm_auto_augment.posterize:
                node.aug_fn = _posterize_keeping_zero_bits
                changed += 1
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
        else:
            # Compose.transforms, RandAugment.ops / AugMixAugment.ops, AutoAugment.policy (lists of lists).
            for name in ('transforms', 'ops', 'policy'):
                children = getattr(node, name, None)
                if isinstance(children, (list, tuple)):
                    pending.extend(children)
    return changed


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch, index), never on worker or process layout."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's global generators for the block, then restore their states.

    timm's transforms draw from these global generators; restoring keeps the caller's streams
    (drop path, Mixup in the main process when ``num_workers=0``) independent of the data.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class SeededSampler(DefaultSampler):
    """mmengine's ``DefaultSampler`` whose indices carry a per-sample augmentation seed.

    Yields ``(index, seed)`` with seed = f(sampler seed, epoch, index). :class:`ImageFolderDataset`
    seeds its random transforms with it, so the augmentation of every sample is a function of the
    epoch alone: it differs between epochs (mmengine reseeds workers identically every epoch, which
    would otherwise repeat the same augmentation), and a resumed run sees exactly the images an
    uninterrupted run would have seen, whatever ``num_workers`` is.
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in super().__iter__():
            yield index, sample_seed(self.seed, self.epoch, index)


def _data_error(data_root: str, what: str) -> str:
    return (f'{what}. Expected the ImageNet folder layout data_root/train/<class>/*.JPEG and '
            f'data_root/val/<class>/*.JPEG (data_root={data_root!r}). Generate a small synthetic data set '
            f'there with: python tools/generate_demo_data.py imagenet {data_root}')


def _class_dirs(split_dir: str, data_root: str) -> list[str]:
    classes = class_folder_names(split_dir)
    if not classes:
        raise FileNotFoundError(_data_error(data_root, f'no class folders in {split_dir}'))
    return classes


class ImageFolderDataset(Dataset):
    """An ImageNet-style split ``data_root/<split>/<class>/<image>`` with a timm transform.

    Args:
        data_root: folder holding ``train/`` and ``val/``.
        split: the sub-folder to read ('train', 'val', ...).
        transform: keyword arguments of ``timm.data.create_transform`` (``input_size``,
            ``is_training``, ``auto_augment``, ``re_prob``, ...); None gives ``ToTensor`` only.
        on_corrupt: what an unreadable image does. 'skip' (default) warns with the file's path and
            returns the next readable sample instead, so one bad file in a long run costs one sample,
            not the run; more than ``MAX_CONSECUTIVE_CORRUPT`` bad files in a row raise. 'error'
            raises at the first one. Skipped files are listed by :attr:`unreadable_files`, which
            ``UnreadableImagesHook`` counts in the log after every epoch.

    Class indices follow the sorted class-folder names of ``train/`` (of ``split`` when there is
    no ``train/``), so every split uses the same label for the same folder name.
    Items: ``dict(inputs=(3, H, W) float tensor, data_samples=class index)``.
    """

    def __init__(self, data_root: str, split: str = 'train', transform: dict | None = None,
                 on_corrupt: str = 'skip'):
        if on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f'on_corrupt must be one of {CORRUPT_POLICIES}, got {on_corrupt!r}')
        data_root = str(data_root)
        if not osp.isdir(data_root):
            raise FileNotFoundError(_data_error(data_root, f'data_root {data_root!r} does not exist'))
        split_dir = osp.join(data_root, split)
        if not osp.isdir(split_dir):
            raise FileNotFoundError(_data_error(data_root, f'split folder {split_dir!r} does not exist'))
        classes = _class_dirs(split_dir, data_root)
        train_dir = osp.join(data_root, 'train')
        if split != 'train' and osp.isdir(train_dir):
            train_classes = _class_dirs(train_dir, data_root)
            unknown = sorted(set(classes) - set(train_classes))
            if unknown:
                raise ValueError(f'{split_dir} has class folders that {train_dir} lacks: {unknown[:10]}; '
                                 'both splits must use the same class folder names')
            classes = train_classes
        self.data_root, self.split, self.on_corrupt = data_root, split, on_corrupt
        self.classes = tuple(classes)
        self.samples: list[tuple[str, int]] = []
        present = set(os.listdir(split_dir))
        for label, name in enumerate(self.classes):
            if name not in present:
                continue  # a val split may cover fewer classes than train
            class_dir = osp.join(split_dir, name)
            files = sorted(f for f in os.listdir(class_dir) if is_image_name(f))
            if not files:
                raise ValueError(f'class folder {class_dir!r} holds no images; allowed extensions '
                                 f'(any case): {", ".join(IMAGE_EXTENSIONS)}')
            self.samples += [(osp.join(class_dir, f), label) for f in files]
        self.transform_cfg = dict(transform or {})
        self.transform = create_transform(**self.transform_cfg) if transform is not None else ToTensor()
        keep_posterize_working(self.transform)
        # One flag per sample in shared memory: data loader workers (forked, or spawned with the
        # dataset as an argument) set it when they skip a file, and the main process counts them.
        self._unreadable = multiprocessing.RawArray('B', max(len(self.samples), 1))

    @property
    def metainfo(self) -> dict:
        return dict(classes=self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def unreadable_files(self) -> list[str]:
        """Paths skipped as unreadable so far, by this process and its data loader workers."""
        flags = np.frombuffer(self._unreadable, dtype=np.uint8)[:len(self.samples)]
        return [self.samples[i][0] for i in np.flatnonzero(flags)]

    def _read(self, index: int) -> tuple[Image.Image, int]:
        """The first readable image at or after ``index`` (wrapping) and its label."""
        for attempt in range(MAX_CONSECUTIVE_CORRUPT + 1):
            i = (index + attempt) % len(self.samples)
            path, label = self.samples[i]
            try:
                with Image.open(path) as img:
                    return img.convert('RGB'), label
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated / non-image files
                if self.on_corrupt == 'error':
                    raise RuntimeError(f'cannot read image {path}: {err} (set on_corrupt="skip" in the '
                                       'dataset config to skip unreadable images with a warning)') from err
                self._unreadable[i] = 1
                warnings.warn(f'skipping unreadable image {path}: {err}', RuntimeWarning, stacklevel=2)
        raise RuntimeError(f'{MAX_CONSECUTIVE_CORRUPT + 1} unreadable images in a row from '
                           f'{self.samples[index][0]} on: the data set looks broken')

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, None)
        img, label = self._read(int(index))
        if seed is None:
            inputs = self.transform(img)
        else:
            with seeded_rng(seed):
                inputs = self.transform(img)
        return dict(inputs=inputs, data_samples=label)
