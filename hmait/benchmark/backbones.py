"""The detection/segmentation backbones at dense-prediction sizes: ``HMaiT`` against mmdet's ``SwinTransformer``.

At these sizes the token count of a stage is what decides: H-MaiT's global heads cost ``N^2``
per stage, Swin's windows ``N``. So each row puts the FLOP ratio (from
:func:`hmait.analysis.complexity.count_complexity`, attention counted analytically for H-MaiT,
Swin's window matmuls traced) beside the measured time ratio. Both backbones are built with the
same dims, depths and heads (``arch``), run the forward pass of a fixed random batch under
``torch.inference_mode``, alternately (:func:`~hmait.benchmark.measure.time_alternating`).

mmdet is imported only when a comparison runs, so the core package stays importable without it.
"""
from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..models.hmait import ARCH_SETTINGS
from ..ops.global_attention import GLOBAL_SPANS
from .measure import RUN_ERRORS, describe_error, markdown_table, time_alternating

# Swin's shapes for the H-MaiT presets (mmdet's SwinTransformer arguments): H-MaiT's own, without the masking.
SWIN_ARCH = {arch: {k: v for k, v in settings.items() if k != 'masked_heads'}
             for arch, settings in ARCH_SETTINGS.items()}
BACKBONES = ('HMaiT', 'SwinTransformer')


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """``'BxCxHxW'`` (e.g. ``1x3x800x1344``) -> ``(B, C, H, W)``; ValueError naming the text otherwise."""
    match = re.fullmatch(r'(\d+)x(\d+)x(\d+)x(\d+)', text.strip())
    if not match or 0 in (dims := tuple(int(g) for g in match.groups())):
        raise ValueError(f'backbone shape {text!r} must be BATCHxCHANNELSxHEIGHTxWIDTH of positive integers, '
                         'e.g. 1x3x800x1344')
    return dims


def _label(backbone: str, global_attn: str | None) -> str:
    return backbone if global_attn is None else f'{backbone} {global_attn}'


def build_backbone(name: str, arch: str = 'tiny', in_channels: int = 3, global_attn: str = 'full') -> nn.Module:
    """``HMaiT`` (this project, its global heads' span ``global_attn``) or mmdet's ``SwinTransformer``
    (window 7), freshly initialised, eval mode."""
    from ..builder import build_backbone as build

    if arch not in SWIN_ARCH:
        raise ValueError(f'arch must be one of {sorted(SWIN_ARCH)}, got {arch!r}')
    if name == 'HMaiT':
        model = build(dict(type='HMaiT', arch=arch, in_channels=in_channels, drop_path_rate=0.,
                           global_attn=global_attn))
    elif name == 'SwinTransformer':
        model = build(dict(type='mmdet.SwinTransformer', in_channels=in_channels, window_size=7, drop_path_rate=0.,
                           **SWIN_ARCH[arch]))
    else:
        raise ValueError(f'backbone must be one of {BACKBONES}, got {name!r}')
    model.eval()  # mmdet's train() override returns None, so no chaining
    return model


@dataclass
class BackboneMeasurement:
    """One backbone at one input shape: medians over repetitions; ``error`` when it could not run."""

    backbone: str
    global_attn: str | None
    arch: str
    shape: tuple[int, int, int, int]
    precision: str
    images_per_s: float | None = None
    ms_per_iter: float | None = None
    gflops: float | None = None
    repetitions_ms: list[float] = field(default_factory=list)
    error: str | None = None


def _flops(model: nn.Module, shape: tuple[int, int, int, int]) -> float:
    from ..analysis.complexity import count_complexity
    return count_complexity(model, torch.zeros(shape)).macs / 1e9


def _forward(model: nn.Module, images: torch.Tensor, precision: str) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                                    enabled=precision == 'bf16'):
            model(images)
    return step


def measure_backbones(shapes: Sequence[tuple[int, int, int, int]], precisions: Sequence[str] = ('fp32',),
                      arch: str = 'tiny', warmup: int = 1, iters: int = 1, reps: int = 3,
                      device: torch.device | str = 'cpu', global_attns: Sequence[str] = GLOBAL_SPANS,
                      attention_free: bool = False,
                      log: Callable[[str], None] | None = None) -> list[BackboneMeasurement]:
    """Swin and HMaiT with each span of its global heads in ``global_attns`` at every shape and
    precision (``'fp32'``, ``'bf16'`` autocast), timed alternately. ``attention_free`` adds
    ``HMaiT+attention-free``, its attention layers reduced to their projections
    (:func:`~hmait.benchmark.models.without_token_mixing`): the floor of any attention work."""
    from .models import ATTENTION_FREE, without_token_mixing

    device = torch.device(device)
    if not global_attns or any(span not in GLOBAL_SPANS for span in global_attns):
        raise ValueError(f'global_attns must be a non-empty list of {GLOBAL_SPANS}, got {global_attns!r}')
    kinds = [('SwinTransformer', None)] + [('HMaiT', span) for span in dict.fromkeys(global_attns)]
    models = {_label(*kind): build_backbone(kind[0], arch, global_attn=kind[1] or 'full').to(device) for kind in kinds}
    kind_of = {_label(*kind): kind for kind in kinds}
    if attention_free:
        kind_of['HMaiT' + ATTENTION_FREE] = ('HMaiT' + ATTENTION_FREE, None)
        models['HMaiT' + ATTENTION_FREE] = without_token_mixing(build_backbone('HMaiT', arch).to(device))
    results = []
    for shape in shapes:
        flops = {}
        for name, model in models.items():
            if name.endswith(ATTENTION_FREE):
                continue  # the analytic count would add the attention it does not run
            try:
                flops[name] = _flops(model, shape)
            except RUN_ERRORS as exc:
                flops[name] = None
                if log is not None:
                    log(f'{name} {shape}: FLOPs not counted ({describe_error(exc)})')
        for precision in precisions:
            if log is not None:
                log(f'backbones {"x".join(map(str, shape))} {precision}')
            images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
            steps = {name: _forward(model, images, precision) for name, model in models.items()}
            times, errors = time_alternating(steps, reps=reps, iters=iters, warmup=warmup, device=device, log=log)
            for name in models:
                row = BackboneMeasurement(*kind_of[name], arch, tuple(shape), precision, gflops=flops.get(name))
                if name in times:
                    seconds = times[name]
                    row.repetitions_ms = [1e3 * t for t in seconds]
                    row.ms_per_iter = 1e3 * statistics.median(seconds)
                    row.images_per_s = shape[0] / statistics.median(seconds)
                row.error = errors.get(name)
                results.append(row)
    return results


def backbone_ratios(rows: Sequence[BackboneMeasurement]) -> list[dict]:
    """H-MaiT / Swin per shape and precision: throughput ratio (paired per repetition too) and FLOP ratio."""
    swins = {(r.shape, r.precision): r for r in rows if r.backbone == 'SwinTransformer'}
    out = []
    for r in rows:
        swin = swins.get((r.shape, r.precision))
        if not r.backbone.startswith('HMaiT') or swin is None or r.images_per_s is None or swin.images_per_s is None:
            continue
        paired = sorted(s / h for h, s in zip(r.repetitions_ms, swin.repetitions_ms))
        out.append(dict(shape=r.shape, precision=r.precision, global_attn=r.global_attn,
                        throughput_ratio=r.images_per_s / swin.images_per_s,
                        paired_ratio=statistics.median(paired) if paired else None,
                        paired_ratio_range=f'{paired[0]:.2f}-{paired[-1]:.2f}' if paired else None,
                        flop_ratio=r.gflops / swin.gflops if r.gflops and swin.gflops else None))
    return out


BACKBONE_COLUMNS = [('backbone', 'backbone'), ('input', 'input'), ('precision', 'precision'),
                    ('ms_per_iter', 'ms/iter:'), ('images_per_s', 'images/s:'), ('gflops', 'GFLOPs:'),
                    ('throughput_ratio', 'throughput vs Swin:'), ('paired_ratio', 'per repetition: median:'),
                    ('paired_ratio_range', 'range'), ('flop_ratio', 'FLOPs vs Swin:')]


def backbone_table(rows: Sequence[BackboneMeasurement]) -> str:
    """One row per backbone and setting, the ratios to Swin on the H-MaiT rows."""
    ratio = {(r['shape'], r['precision'], r['global_attn']): r for r in backbone_ratios(rows)}
    table_rows = []
    for r in rows:
        row = dict(backbone=f'{_label(r.backbone, r.global_attn)} ({r.arch})', input='x'.join(map(str, r.shape)),
                   precision=r.precision, ms_per_iter=r.ms_per_iter, images_per_s=r.error or r.images_per_s,
                   gflops=r.gflops)
        if r.backbone.startswith('HMaiT'):
            row.update({k: v for k, v in ratio.get((r.shape, r.precision, r.global_attn), {}).items()
                        if k != 'global_attn'})
        table_rows.append(row)
    return markdown_table(BACKBONE_COLUMNS, table_rows)
