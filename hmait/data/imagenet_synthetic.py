"""A small, learnable synthetic classification set in ImageNet's folder layout (real JPEG files).

Each class is a shape (disc, square, triangle, ring, plus, stripes, ...) drawn at a random
position, size, rotation and colour on a random textured background, so telling classes apart
requires recognising the shape, not a colour or a pixel statistic, and survives RandAugment.
Everything is drawn from ``numpy.random.default_rng((seed, split, class, index))``: the same
arguments always give the same files.
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..ops.checks import check_int

# The first ten are the demo's classes. Square and frame come last: at 64 px a small rotated square is
# a few pixels from a disc or a triangle, and a frame from a ring, and they were most of the demo's
# errors.
SHAPES = ('disc', 'triangle', 'ring', 'plus', 'hstripes', 'vstripes', 'checker', 'star', 'crescent', 'dots',
          'square', 'frame')
# Classes beyond the number of shapes reuse a shape at another size band.
SIZE_BANDS = ((0.55, 0.85), (0.3, 0.45))
MAX_CLASSES = len(SHAPES) * len(SIZE_BANDS)
MARKER = '.hmait-synthetic.json'
# Bumped whenever the drawing changes, so an existing folder from an older version is regenerated.
GENERATOR_VERSION = 3
SPLITS = {'train': 0, 'val': 1}
# What each format writes at the top of its folder: removed when the folder is regenerated.
FORMAT_ENTRIES = {'imagenet': ('train', 'val'), 'coco': ('train2017', 'val2017', 'annotations'),
                  'ade20k': ('images', 'annotations')}


def claim_folder(out_dir: str, params: dict) -> bool:
    """Prepare ``out_dir`` for a generator run with ``params`` (``params['format']`` one of
    ``FORMAT_ENTRIES``): True when it already holds exactly that data set, so nothing is to be written.

    A non-empty folder without this project's marker is refused (FileExistsError naming it); one
    generated with other arguments, or interrupted, loses what its format wrote. Call
    :func:`mark_folder` once everything is written.
    """
    marker = osp.join(out_dir, MARKER)
    if not (osp.isdir(out_dir) and os.listdir(out_dir)):
        return False
    if not osp.isfile(marker):
        raise FileExistsError(f'{out_dir} exists, is not empty and was not written by this generator; '
                              'choose another folder or empty it')
    with open(marker) as f:
        previous = json.load(f)
    if previous == params:
        return True
    for entry in FORMAT_ENTRIES.get(previous.get('format'), ()):
        shutil.rmtree(osp.join(out_dir, entry), ignore_errors=True)
    os.remove(marker)
    return False


def mark_folder(out_dir: str, params: dict) -> None:
    """Record ``params`` in ``out_dir``: written last, so a folder without it is an interrupted run."""
    with open(osp.join(out_dir, MARKER), 'w') as f:
        json.dump(params, f)


def _polygon(cx: float, cy: float, radius: float, angle: float, corners: int, inner: float | None = None) -> list:
    points = []
    step = 2 * math.pi / corners
    for k in range(corners):
        points.append((cx + radius * math.cos(angle + k * step), cy + radius * math.sin(angle + k * step)))
        if inner is not None:  # star: alternate outer and inner corners
            a = angle + (k + 0.5) * step
            points.append((cx + inner * radius * math.cos(a), cy + inner * radius * math.sin(a)))
    return points


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                colour: tuple, background: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(2, int(r * 0.3))
    if shape == 'disc':
        draw.ellipse(box, fill=colour)
    elif shape == 'square':
        draw.polygon(_polygon(cx, cy, r, angle, 4), fill=colour)
    elif shape == 'triangle':
        draw.polygon(_polygon(cx, cy, r, angle, 3), fill=colour)
    elif shape == 'ring':
        draw.ellipse(box, outline=colour, width=width)
    elif shape == 'plus':
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=width)
    elif shape == 'frame':
        corners = _polygon(cx, cy, r, angle, 4)
        draw.line(corners + corners[:1], fill=colour, width=width, joint='curve')
    elif shape in ('hstripes', 'vstripes'):
        period = max(4, int(r * 0.5))
        for k in range(-3, 4):
            offset = k * period
            if shape == 'hstripes':
                draw.rectangle((cx - r, cy + offset - period / 4, cx + r, cy + offset + period / 4), fill=colour)
            else:
                draw.rectangle((cx + offset - period / 4, cy - r, cx + offset + period / 4, cy + r), fill=colour)
    elif shape == 'checker':
        cell = r / 2
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * cell, cy - r + j * cell
                    draw.rectangle((x0, y0, x0 + cell, y0 + cell), fill=colour)
    elif shape == 'star':
        draw.polygon(_polygon(cx, cy, r, angle, 5, inner=0.4), fill=colour)
    elif shape == 'crescent':
        draw.ellipse(box, fill=colour)
        shift = r * 0.5
        draw.ellipse((cx - r + shift * math.cos(angle), cy - r + shift * math.sin(angle),
                      cx + r + shift * math.cos(angle), cy + r + shift * math.sin(angle)), fill=background)
    elif shape == 'dots':
        for k in range(3):
            a = angle + k * 2 * math.pi / 3
            x, y, d = cx + 0.6 * r * math.cos(a), cy + 0.6 * r * math.sin(a), 0.3 * r
            draw.ellipse((x - d, y - d, x + d, y + d), fill=colour)
    else:
        raise ValueError(f'unknown shape {shape!r}')


def render_sample(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of class ``label``."""
    shape = SHAPES[label % len(SHAPES)]
    low, high = SIZE_BANDS[label // len(SHAPES)]
    # Background: a gentle random colour gradient plus grain, so no class owns a flat colour.
    c0 = rng.uniform(0, 255, 3)
    c1 = np.clip(c0 + rng.uniform(-40, 40, 3), 0, 255)
    t = np.linspace(0, 1, size)[:, None, None]
    grad = c0 * (1 - t) + c1 * t
    if rng.random() < 0.5:
        grad = grad.transpose(1, 0, 2)
    bg = np.broadcast_to(grad, (size, size, 3)) + rng.normal(0, 6, (size, size, 3))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    mean_bg = tuple(int(v) for v in (c0 + c1) / 2)
    # Foreground colour far from the background's mean colour keeps the shape visible.
    while True:
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if sum(abs(a - b) for a, b in zip(colour, mean_bg)) > 180:
            break
    r = rng.uniform(low, high) * size / 2
    cx, cy = rng.uniform(r, size - r, 2)
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, r, rng.uniform(0, 2 * math.pi), colour, mean_bg)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 0.8))))


def class_names(num_classes: int) -> list[str]:
    """Folder names: a sortable index first (so sorted folder order is class order), then the shape."""
    return [f'c{k:03d}_{SHAPES[k % len(SHAPES)]}{"_small" if k >= len(SHAPES) else ""}' for k in range(num_classes)]


def generate_imagenet(out_dir: str, num_classes: int = 10, train_per_class: int = 100, val_per_class: int = 20,
                      size: int = 64, seed: int = 0, quality: int = 90) -> dict:
    """Write ``out_dir/{train,val}/<class>/<name>.JPEG`` and return a summary dict.

    Re-running with the same arguments on a generated folder does nothing; other arguments
    regenerate it. A non-empty folder that this function did not write is refused.
    """
    for name, value, minimum in (('num_classes', num_classes, 2), ('train_per_class', train_per_class, 1),
                                 ('val_per_class', val_per_class, 1), ('size', size, 16)):
        check_int(name, value, minimum=minimum)
    if num_classes > MAX_CLASSES:
        raise ValueError(f'num_classes must be at most {MAX_CLASSES} (shapes x size bands), got {num_classes}')
    if not 1 <= quality <= 95:
        raise ValueError(f'quality must lie in [1, 95], got {quality!r}')
    params = dict(format='imagenet', version=GENERATOR_VERSION, num_classes=num_classes,
                  train_per_class=train_per_class, val_per_class=val_per_class, size=size, seed=seed, quality=quality)
    if claim_folder(out_dir, params):
        return dict(params, out_dir=out_dir, generated=False)
    names = class_names(num_classes)
    for split, split_id in SPLITS.items():
        count = train_per_class if split == 'train' else val_per_class
        for label, name in enumerate(names):
            folder = osp.join(out_dir, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng((seed, split_id, label, i))
                render_sample(label, size, rng).save(osp.join(folder, f'{split}_{label:03d}_{i:05d}.JPEG'),
                                                     quality=quality)
    mark_folder(out_dir, params)
    return dict(params, out_dir=out_dir, generated=True)
