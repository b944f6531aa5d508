"""What the analysis command-line tools share: a model from a training config and a checkpoint,
images from an ImageNet-layout folder, heat maps, and a config snippet for a masking.

The analysis needs only the timm model inside a classification config, not the training wrapper:
:func:`hmait.builder.build_model` with ``part='classifier'``, weights loaded strictly.
"""
from __future__ import annotations

import math
import os
import os.path as osp
import re
import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.data import ImageDataset, create_transform, resolve_data_config

from ..builder import build_model, classifier_fields, read_config
from ..ops.checks import check_positive_int
from ..predict import read_image
from .complexity import config_test_shape
from .search import SearchStep


def _image_root(data: str) -> str:
    if not osp.isdir(data):
        raise FileNotFoundError(f'--data {data!r} is not a folder; expected an ImageNet-layout folder '
                                f'(<class>/<image> files, or val/<class>/<image>)')
    val = osp.join(data, 'val')
    return val if osp.isdir(val) else data


def image_loader(data: str, model: nn.Module, img_size: int, num_images: int,
                 batch_size: int) -> torch.utils.data.DataLoader:
    """Evaluation-transformed images from an ImageNet-layout folder (``data/val`` when it exists).

    ``num_images`` images are taken evenly spread over the sorted file list, so all classes appear.
    """
    for name, value in (('img_size', img_size), ('num_images', num_images), ('batch_size', batch_size)):
        check_positive_int(name, value)
    root = _image_root(data)
    try:
        config = resolve_data_config({'input_size': (3, img_size, img_size)}, model=model)
        dataset = ImageDataset(root, transform=create_transform(**config, is_training=False))
    except Exception as err:  # timm raises RuntimeError / FileNotFoundError for unusable folders
        raise ValueError(f'--data {data!r}: cannot read images from {root!r}: {err}') from err
    if len(dataset) == 0:
        raise ValueError(f'--data {data!r}: no images found under {root!r}')
    count = min(num_images, len(dataset))
    indices = sorted({int(i) for i in torch.linspace(0, len(dataset) - 1, count).round()})
    for index in indices:
        # timm's dataset would log a warning and hand over the next image in its place, counting that twice.
        try:
            read_image(dataset.filename(index, absolute=True))
        except ValueError as err:
            raise ValueError(f'--data {data!r}: {err}') from err
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                       shuffle=False, num_workers=0)


def save_heatmap(matrix: torch.Tensor | Sequence[Sequence[float]], path: str, title: str, xlabel: str,
                 ylabel: str,
                 xticks: Sequence[str] | None = None, yticks: Sequence[str] | None = None,
                 marked: Sequence[Sequence[bool]] | None = None, vmin: float = 0., vmax: float = 1.) -> None:
    """Write a heat map PNG with each finite cell's value printed; ``marked`` cells get a frame."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    data = torch.as_tensor(matrix, dtype=torch.float32)
    rows, cols = data.shape
    fig, ax = plt.subplots(figsize=(max(4., 0.6 * cols + 2.5), max(3., 0.32 * rows + 1.5)))
    image = ax.imshow(data.numpy(), cmap='viridis', vmin=vmin, vmax=vmax, aspect='auto')
    fig.colorbar(image, ax=ax)
    if rows * cols <= 400:
        for i in range(rows):
            for j in range(cols):
                value = float(data[i, j])
                if not math.isnan(value):
                    ax.text(j, i, f'{value:.2f}', ha='center', va='center', fontsize=7,
                            color='black' if value > (vmin + vmax) / 2 else 'white')
    if marked is not None:
        for i, row in enumerate(marked):
            for j, flag in enumerate(row):
                if flag:
                    ax.add_patch(Rectangle((j - .5, i - .5), 1, 1, fill=False, edgecolor='red',
                                           linewidth=1.5))
    ax.set_xticks(range(cols), list(xticks) if xticks is not None else range(cols), fontsize=7)
    ax.set_yticks(range(rows), list(yticks) if yticks is not None else range(rows), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def short_layer_names(names: Sequence[str]) -> list[str]:
    """``blocks.3.attn`` -> ``3``, ``layers.1.blocks.0.attn`` -> ``s1.b0`` (for plot ticks)."""
    out = []
    for name in names:
        stage = re.search(r'layers\.(\d+)\.blocks\.(\d+)', name)
        block = re.search(r'blocks\.(\d+)', name)
        out.append(f's{stage.group(1)}.b{stage.group(2)}' if stage else block.group(1) if block else name)
    return out


def masking_snippet(step: SearchStep, mask_modes: Sequence[str]) -> str:
    """The resulting masking as a config snippet for the classification config's ``model_kwargs``.

    For H-MaiT, whose masking is one count per stage, the per-stage form is given only when every
    block of a stage agrees; otherwise the per-block counts are shown for the user to choose.
    """
    header = (f'# quick mask search, {step.stage} step (upper={step.upper}, lower={step.lower})\n'
              f'# masked heads per layer before: {step.before}\n')
    stages: dict[int, list[int]] = {}
    for name, count in zip(step.layers, step.masked_heads):
        match = re.search(r'layers\.(\d+)\.blocks\.\d+', name)
        if match is None:
            stages = {}
            break
        stages.setdefault(int(match.group(1)), []).append(count)
    if stages:
        per_stage = [stages[i] for i in sorted(stages)]
        if all(len(set(c)) == 1 for c in per_stage):
            return header + f'model = dict(model_kwargs=dict(masked_heads={[c[0] for c in per_stage]}))\n'
        return header + (f'# H-MaiT takes one count per stage, but the blocks of a stage disagree: '
                         f'per stage, per block {per_stage}\n'
                         '# choose one per stage: model = dict(model_kwargs=dict(masked_heads=[...]))\n')
    kwargs = f'masked_heads={step.masked_heads}'
    modes = ['hard' if m == 'none' else m for m in mask_modes]
    if any(m != 'hard' for m in modes):
        kwargs += f', mask_mode={modes}'
    return header + f'model = dict(model_kwargs=dict({kwargs}))\n'


def prepare_or_refuse(tool: str, args) -> tuple[nn.Module, torch.utils.data.DataLoader, dict]:
    """:func:`prepare` from an analysis tool's arguments; a user error (a config, checkpoint or folder that
    does not fit) ends the tool with one line naming it and exit status 2, as argparse does."""
    try:
        return prepare(args.config, args.checkpoint, args.data, args.img_size, args.num_images, args.batch_size)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # RuntimeError: not a plain weights file
        print(f'{tool}: error: {err}', file=sys.stderr)
        raise SystemExit(2) from None


def _evaluated_size(cfg, model: nn.Module) -> int:
    """The size the config evaluates its model at (its test transform's input_size), else the size the
    model was built for (MaiT's img_size), else its timm default (224)."""
    try:
        return int(config_test_shape(cfg)[-1])
    except ValueError:  # the config names no test size
        built = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
        default = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))[-1]
        return int(built[-1] if built else default)


def prepare(config: str, checkpoint: str, data: str, img_size: int | None, num_images: int,
            batch_size: int) -> tuple[nn.Module, torch.utils.data.DataLoader, dict]:
    """Model from ``config`` with ``checkpoint`` loaded (strictly), and an image loader over ``data``.

    ``img_size`` None takes the size the model was built for. Returns ``(model, loader, fields)``.
    """
    cfg = read_config(config)
    fields = classifier_fields(cfg)
    model = build_model(cfg, checkpoint, part='classifier')
    if img_size is None:
        img_size = _evaluated_size(cfg, model)
    loader = image_loader(data, model, img_size, num_images, batch_size)
    return model.eval(), loader, dict(fields, img_size=img_size, num_images=len(loader.dataset))
