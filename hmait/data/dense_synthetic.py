"""Small, deterministic dense-prediction datasets in the real COCO and ADE20K on-disk formats.

Tests and demos need data that mmdet's ``CocoDataset`` and mmseg's ``ADE20KDataset`` load
unchanged, so the layouts match those libraries' defaults: a detection config only needs its
``data_root`` pointed at the generated folder. This module uses numpy, PIL and json only
(the core package never imports mmdet or mmseg).

Images show filled polygons on a noisy background; each class has its own base colour, so a
model can actually learn something in a few iterations.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..ops.checks import check_int, is_int
from .imagenet_synthetic import GENERATOR_VERSION, claim_folder, mark_folder

# The 80 COCO instance categories in id order. Every generated annotation file lists all of them,
# as the real one does: mmdet's CocoMetric maps a predicted class index back to a category id
# through the file's categories, so a file with fewer would break evaluation of an 80-class head.
COCO_CLASSES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow',
    'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard',
    'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch',
    'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book', 'clock', 'vase',
    'scissors', 'teddy bear', 'hair drier', 'toothbrush')
# COCO numbers its categories 1..90 with ten ids unused.
_COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CATEGORIES = tuple(zip((i for i in range(1, 91) if i not in _COCO_UNUSED_IDS), COCO_CLASSES))
# ADE20K stores class k (1..150) as pixel value k and 0 as "other", ignored with reduce_zero_label.
ADE20K_NUM_CLASSES = 150


def _check_size(name: str, value: Sequence[int]) -> tuple[int, int]:
    size = tuple(value)
    if len(size) != 2 or any(not is_int(v) or v < 16 for v in size):
        raise ValueError(f'{name} must be (height, width) with both at least 16 pixels, got {value!r}')
    return size


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    check_int(name, value, minimum=minimum)


def _class_colours(num_classes: int, seed: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours; one channel saturated so they stand out from the grey background."""
    rng = np.random.RandomState(seed + 7919)
    colours = rng.randint(0, 256, size=(num_classes, 3))
    colours[np.arange(num_classes), np.arange(num_classes) % 3] = 255
    return colours.astype(np.uint8)


def _background(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 grey noise."""
    return np.clip(rng.normal(128, 20, size=(height, width, 3)), 0, 255).astype(np.uint8)


def _random_polygon(rng: np.random.RandomState, height: int, width: int) -> list[tuple[float, float]]:
    """A star-shaped polygon (5-9 vertices) fully inside the image, as (x, y) pairs."""
    radius = rng.uniform(0.12, 0.3) * min(height, width)
    cx = rng.uniform(radius, width - radius)
    cy = rng.uniform(radius, height - radius)
    count = rng.randint(5, 10)
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=count))
    radii = radius * rng.uniform(0.6, 1.0, size=count)
    xs = np.clip(cx + radii * np.cos(angles), 0, width - 1)
    ys = np.clip(cy + radii * np.sin(angles), 0, height - 1)
    return [(float(x), float(y)) for x, y in zip(xs, ys)]


def _paint(image: np.ndarray, polygon: list[tuple[float, float]], colour: np.ndarray,
           rng: np.random.RandomState) -> np.ndarray:
    """Paint ``polygon`` into ``image`` (in place); returns its (H, W) bool mask."""
    canvas = Image.new('L', (image.shape[1], image.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    mask = np.asarray(canvas, dtype=bool)
    shade = np.clip(colour.astype(np.int16) + rng.randint(-12, 13, size=3), 0, 255).astype(np.uint8)
    image[mask] = shade
    return mask


def make_coco(root: str, num_train: int = 4, num_val: int = 2, image_size: Sequence[int] = (96, 128),
              num_classes: int = 3, max_objects: int = 3, seed: int = 0) -> dict:
    """Write a COCO instance-segmentation dataset under ``root`` in mmdet's default layout.

    ``root/train2017/*.jpg``, ``root/val2017/*.jpg`` and
    ``root/annotations/instances_{train,val}2017.json`` with polygon masks, boxes ``[x, y, w, h]``
    and objects of the first ``num_classes`` COCO categories (the file lists all 80, with their real
    ids). ``image_size`` is (height, width).
    Returns the paths keyed 'root', 'train_ann', 'val_ann', 'train_img', 'val_img', and 'generated':
    False when ``root`` already held this data set (the same arguments), which is then left as it is.
    A non-empty ``root`` that this project's generators did not write is refused (FileExistsError).
    """
    height, width = _check_size('image_size', image_size)
    _check_count('num_train', num_train)
    _check_count('num_val', num_val)
    _check_count('max_objects', max_objects)
    check_int('num_classes', num_classes, minimum=1, maximum=len(COCO_CATEGORIES))
    paths = dict(root=root)
    for key, split in (('train', 'train2017'), ('val', 'val2017')):
        paths[f'{key}_ann'] = os.path.join(root, 'annotations', f'instances_{split}.json')
        paths[f'{key}_img'] = os.path.join(root, split)
    params = dict(format='coco', version=GENERATOR_VERSION, num_train=num_train, num_val=num_val,
                  image_size=[height, width], num_classes=num_classes, max_objects=max_objects, seed=seed)
    if claim_folder(root, params):
        return dict(paths, generated=False)
    categories = [dict(id=cid, name=name, supercategory='synthetic') for cid, name in COCO_CATEGORIES]
    colours = _class_colours(num_classes, seed)
    ann_id = 1
    for split, count, split_seed in (('train2017', num_train, seed), ('val2017', num_val, seed + 1)):
        rng = np.random.RandomState(split_seed)
        img_dir = os.path.join(root, split)
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            image_id = index + 1
            file_name = f'{image_id:012d}.jpg'
            image = _background(rng, height, width)
            for _ in range(rng.randint(1, max_objects + 1)):
                label = rng.randint(num_classes)
                polygon = _random_polygon(rng, height, width)
                mask = _paint(image, polygon, colours[label], rng)
                ys, xs = np.nonzero(mask)
                if xs.size == 0:
                    continue
                x0, y0 = int(xs.min()), int(ys.min())
                annotations.append(dict(
                    id=ann_id, image_id=image_id, category_id=categories[label]['id'], iscrowd=0,
                    area=float(mask.sum()),
                    bbox=[float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)],
                    segmentation=[[round(c, 2) for point in polygon for c in point]]))
                ann_id += 1
            Image.fromarray(image).save(os.path.join(img_dir, file_name), quality=95)
            images.append(dict(id=image_id, file_name=file_name, height=height, width=width))
        ann_path = os.path.join(root, 'annotations', f'instances_{split}.json')
        os.makedirs(os.path.dirname(ann_path), exist_ok=True)
        with open(ann_path, 'w') as f:
            json.dump(dict(images=images, annotations=annotations, categories=categories,
                           info=dict(description='H-MaiT synthetic COCO-format data'), licenses=[]), f)
    mark_folder(root, params)
    return dict(paths, generated=True)


def make_ade20k(root: str, num_train: int = 4, num_val: int = 2, image_size: Sequence[int] = (96, 128),
                num_classes: int = 4, max_objects: int = 4, seed: int = 0) -> dict:
    """Write an ADE20K-format semantic segmentation dataset under ``root`` (mmseg's default layout).

    ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``:
    single-channel label maps where 0 is "other" (ignored by mmseg with ``reduce_zero_label=True``)
    and classes 1..num_classes are painted as polygons; the rest of each map is class 1 ("wall" in
    ADE20K) so every image has labelled pixels. ``image_size`` is (height, width).
    Returns the paths keyed 'root', 'train_img', 'train_ann', 'val_img', 'val_ann', and 'generated',
    as :func:`make_coco` does (the same refusal of a foreign non-empty ``root``).
    """
    height, width = _check_size('image_size', image_size)
    _check_count('num_train', num_train)
    _check_count('num_val', num_val)
    _check_count('max_objects', max_objects)
    check_int('num_classes', num_classes, minimum=2, maximum=ADE20K_NUM_CLASSES)
    paths = dict(root=root)
    for prefix, split in (('train', 'training'), ('val', 'validation')):
        paths[f'{prefix}_img'] = os.path.join(root, 'images', split)
        paths[f'{prefix}_ann'] = os.path.join(root, 'annotations', split)
    params = dict(format='ade20k', version=GENERATOR_VERSION, num_train=num_train, num_val=num_val,
                  image_size=[height, width], num_classes=num_classes, max_objects=max_objects, seed=seed)
    if claim_folder(root, params):
        return dict(paths, generated=False)
    colours = _class_colours(num_classes + 1, seed)
    for split, count, split_seed in (('training', num_train, seed), ('validation', num_val, seed + 1)):
        rng = np.random.RandomState(split_seed)
        img_dir = os.path.join(root, 'images', split)
        ann_dir = os.path.join(root, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        prefix = 'train' if split == 'training' else 'val'
        for index in range(count):
            name = f'ADE_{prefix}_{index + 1:08d}'
            image = _background(rng, height, width)
            labels = np.ones((height, width), np.uint8)
            # A band of "other" (value 0) exercises the ignore path of reduce_zero_label.
            labels[:, : max(1, width // 16)] = 0
            for _ in range(rng.randint(1, max_objects + 1)):
                label = rng.randint(2, num_classes + 1)
                mask = _paint(image, _random_polygon(rng, height, width), colours[label], rng)
                labels[mask] = label
            Image.fromarray(image).save(os.path.join(img_dir, name + '.jpg'), quality=95)
            Image.fromarray(labels).save(os.path.join(ann_dir, name + '.png'))
    mark_folder(root, params)
    return dict(paths, generated=True)
