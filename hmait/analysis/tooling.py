"""What the analysis command-line tools share: a model from a training config and a checkpoint,
images from an ImageNet-layout folder, heat maps, and a config snippet for a masking.

The training configs describe the classifier as
``model = dict(type='TimmImageClassifier', model_name=..., num_classes=..., model_kwargs=dict(...))``;
the analysis needs only the timm model inside (``timm.create_model`` with those fields), not the
training wrapper.
"""
from __future__ import annotations

import math
import os
import os.path as osp
import re
from collections.abc import Sequence

import timm
import torch
import torch.nn as nn
from mmengine.config import Config
from timm.data import ImageDataset, create_transform, resolve_data_config

from ..models.checkpoint import extract_state_dict, safe_load
from ..ops.checks import check_positive_int
from .search import SearchStep

_LIST_LIMIT = 8


def model_from_config(config: str | Config) -> tuple[nn.Module, dict]:
    """The timm model described by a classification training config, freshly initialised.

    Returns ``(model, fields)`` where fields holds ``model_name``, ``num_classes`` and ``model_kwargs``.
    """
    cfg = Config.fromfile(config) if isinstance(config, str) else config
    model_cfg = cfg.get('model')
    if not isinstance(model_cfg, dict) or 'model_name' not in model_cfg:
        raise ValueError(f'config {getattr(cfg, "filename", config)!r}: expected a classification config '
                         f"whose model is dict(type='TimmImageClassifier', model_name=..., num_classes=..., "
                         f'model_kwargs=dict(...)); got model={model_cfg!r}')
    fields = dict(model_name=model_cfg['model_name'], num_classes=model_cfg.get('num_classes', 1000),
                  model_kwargs=dict(model_cfg.get('model_kwargs') or {}))
    if not timm.is_model(fields['model_name']):
        raise ValueError(f"config: model_name {fields['model_name']!r} is not a timm model "
                         f"(MaiT / H-MaiT models: {timm.list_models('*mait*')})")
    model = timm.create_model(fields['model_name'], num_classes=fields['num_classes'],
                              **fields['model_kwargs'])
    return model, fields


def _shorten(keys: list[str]) -> str:
    shown = ', '.join(keys[:_LIST_LIMIT])
    return f'{shown}, ... ({len(keys)} in all)' if len(keys) > _LIST_LIMIT else shown


def load_checkpoint_strict(model: nn.Module, path: str) -> None:
    """Load a training checkpoint (mmengine ``backbone.`` keys or a bare state dict) into ``model``.

    Every tensor must match: an analysis of a model whose weights only partly load would be
    meaningless. Raises ValueError naming the missing, unexpected and mismatched keys.
    """
    state_dict = extract_state_dict(safe_load(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f'{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})'
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f'{name} keys: {_shorten(keys)}' for name, keys in
                 (('missing', missing), ('unexpected', unexpected), ('shape-mismatched', mismatched)) if keys]
        hint = ''
        if any('soft_mask_logit' in k for k in missing + unexpected):
            hint = ' (soft_mask_logit keys differ: the config and the checkpoint use different mask modes)'
        raise ValueError(f'checkpoint {path} does not fit the model built from the config{hint}: '
                         + '; '.join(parts))
    model.load_state_dict(state_dict, strict=True)


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


def prepare(config: str, checkpoint: str, data: str, img_size: int | None, num_images: int,
            batch_size: int) -> tuple[nn.Module, torch.utils.data.DataLoader, dict]:
    """Model from ``config`` with ``checkpoint`` loaded (strictly), and an image loader over ``data``.

    ``img_size`` None takes the size the model was built for. Returns ``(model, loader, fields)``.
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f'config file not found: {config}')
    model, fields = model_from_config(config)
    load_checkpoint_strict(model, checkpoint)
    if img_size is None:
        # The size the model was built for (MaiT's img_size), else its timm default (224).
        built = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
        default = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))[-1]
        img_size = int(built[-1] if built else default)
    loader = image_loader(data, model, img_size, num_images, batch_size)
    return model.eval(), loader, dict(fields, img_size=img_size, num_images=len(loader.dataset))
