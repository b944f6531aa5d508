"""Parameters and multiply-accumulates (MACs) of H-MaiT models, with attention counted analytically.

Convention (Swin's, mmdet's and fvcore's): one multiply-accumulate counts as one "FLOP", so the
figures compare directly with the FLOPs published for Swin and in the MaiT paper.

Everything except the attention layers is counted by mmengine's jit-based ``FlopAnalyzer``
(convolutions, linears, matmuls, norms). Each attention layer is counted analytically instead: its
qkv and output projections (``4 N C^2`` for C channels) and its core, per the paper's Table 1, per
block and image:

* global head: ``2 N^2 d`` (``q k^T`` and ``A v``),
* masked head, 'hard' or 'strict': ``2 R^2 N d`` (R = mask_size), linear in N,
* masked head, 'soft': ``2 N^2 d``, since every non-neighbour logit ``alpha q k^T`` is needed,

with N tokens of the stage and d the head dimension. Global heads with a span other than 'full'
(``HMaiT(global_attn=...)``) on a grid larger than their span grid ``g_h x g_w`` count instead
``2 N K d`` with K = ``min(h, g_h) * min(w, g_w)`` pooled keys ('pooled'), or ``2 N_pad (g_h g_w) d``
over the padded windows ('windowed'). Pooled layers project their global heads' keys and values from
the pooled tokens (see :class:`~hmait.models.layers.MaskedMultiheadAttention`): K instead of N tokens
for those rows of the qkv projection, plus the pooling itself. The tracer cannot be trusted with the
attention layers: it does not count ``scaled_dot_product_attention``, sees only parts of the shifted
multiply-adds of the masked heads, and takes the layer's plain projection (its hooks on every
module make the pooled layers project every token), so whatever it counted inside each attention
module is subtracted and the analytic figure added instead.

Models come from :func:`hmait.builder.build_model`, which imports mmdet or mmseg only through
mmengine's registry scope, never at import time, so the core package stays importable without them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.config import Config

from ..builder import build_model, read_config
from ..models.layers import MaskedMultiheadAttention
from ..ops.checks import is_int
from ..ops.global_attention import span_fits


def _beyond(hw: tuple[int, int] | None, span: str, grid: tuple[int, int] | None) -> bool:
    return span != 'full' and hw is not None and not span_fits(hw[0], hw[1], grid)


def global_head_macs(num_tokens: int, head_dim: int, hw: tuple[int, int] | None = None, span: str = 'full',
                     grid: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one global head's core for one image: ``num_tokens`` tokens, of which
    the ``hw`` grid, with the span ``span`` over ``grid`` (see :mod:`hmait.ops.global_attention`)."""
    if not _beyond(hw, span, grid):
        return 2 * num_tokens * num_tokens * head_dim
    h, w = hw
    if span == 'pooled':
        return 2 * num_tokens * min(h, grid[0]) * min(w, grid[1]) * head_dim
    padded = math.ceil(h / grid[0]) * grid[0] * math.ceil(w / grid[1]) * grid[1]
    return 2 * padded * grid[0] * grid[1] * head_dim


def attention_macs(num_tokens: int, head_dim: int, num_heads: int, num_masked_heads: int = 0,
                   mask_size: int = 3, mode: str = 'hard', hw: tuple[int, int] | None = None, span: str = 'full',
                   grid: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one attention core (no qkv / proj linears) for one image (Table 1);
    ``hw``, ``span`` and ``grid`` as in :func:`global_head_macs`."""
    masked_cost = (2 * num_tokens * num_tokens * head_dim if mode == 'soft'
                   else 2 * mask_size ** 2 * num_tokens * head_dim)
    global_cost = global_head_macs(num_tokens, head_dim, hw, span, grid)
    return num_masked_heads * masked_cost + (num_heads - num_masked_heads) * global_cost


def projection_macs(num_tokens: int, dim: int, num_heads: int, num_masked_heads: int = 0,
                    hw: tuple[int, int] | None = None, span: str = 'full', grid: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of an attention layer's qkv and output projections for one image: ``4 N C^2``,
    less what pooled global heads save by projecting their keys and values from the pooled tokens."""
    full = 4 * num_tokens * dim * dim
    if span != 'pooled' or not _beyond(hw, span, grid) or num_masked_heads == num_heads:
        return full
    h, w = hw
    oh, ow = min(h, grid[0]), min(w, grid[1])
    kv_rows = 2 * dim * (num_heads - num_masked_heads) // num_heads
    pooling = dim * (oh * h * w + oh * ow * w)  # the tokens, rows then columns
    return full - (num_tokens - oh * ow) * dim * kv_rows + pooling


@dataclass
class ComplexityReport:
    """What :func:`count_complexity` measured. MACs are for the whole input batch."""

    params: int
    macs: int
    traced_macs: int
    attention_traced_macs: int
    attention_analytic_macs: int
    by_module: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop('by_module')
        return out


def _attention_tokens(model: nn.Module, inputs: tuple) -> dict[str, tuple[int, int, tuple[int, int]]]:
    """Run ``model`` once and record (batch, tokens, grid ``(h, w)``) seen by every masked attention module."""
    seen: dict[str, tuple[int, int, tuple[int, int]]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MaskedMultiheadAttention):
            def hook(mod, args, _name=name):
                x, hw = args[0], args[1]
                seen[_name] = (x.shape[0], x.shape[1], (int(hw[0]), int(hw[1])))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def count_complexity(model: nn.Module, inputs: torch.Tensor | tuple) -> ComplexityReport:
    """Parameters and MACs of ``model(*inputs)`` in eval mode, attention counted per paper Table 1.

    ``model`` must return tensors (or tuples/lists of them) so that it can be traced.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        tokens = _attention_tokens(model, inputs)
        analyzer = FlopAnalyzer(model, inputs)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        by_module = dict(analyzer.by_module())
        traced = int(analyzer.total())
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    attention_traced = attention_analytic = 0
    for name, (batch, num_tokens, hw) in tokens.items():
        attn = modules[name]
        attention_traced += by_module.get(name, 0)
        spans = (hw, attn.global_attn, attn.global_grid)
        attention_analytic += batch * (
            attention_macs(num_tokens, attn.head_dim, attn.num_heads, attn.num_masked_heads, attn.mask_size,
                           attn.mode, *spans)
            + projection_macs(num_tokens, attn.num_heads * attn.head_dim, attn.num_heads, attn.num_masked_heads,
                              *spans))
    params = int(parameter_count(model)[''])
    return ComplexityReport(params=params, macs=traced - attention_traced + attention_analytic,
                            traced_macs=traced, attention_traced_macs=attention_traced,
                            attention_analytic_macs=attention_analytic, by_module=by_module)


class _TensorForward(nn.Module):
    """Calls an OpenMMLab model in 'tensor' mode with fixed data samples, so the tracer sees ``f(x)``."""

    def __init__(self, model: nn.Module, data_samples: list | None):
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, x: torch.Tensor):
        return self.model(x, self.data_samples, mode='tensor')


def _image_metas(height: int, width: int) -> list:
    # mmdet's heads read only ``.metainfo`` of their data samples in tensor mode; mmengine's base
    # element provides that without importing mmdet here.
    from mmengine.structures import BaseDataElement

    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                batch_input_shape=(height, width), scale_factor=(1., 1.))
    return [BaseDataElement(metainfo=meta)]


def config_test_shape(cfg: Config) -> tuple[int, int]:
    """The ``(H, W)`` input of a config's test data: what its model sees at test time.

    * timm-style transforms (the classification configs): ``input_size`` of the test dataset's transform;
    * mmdet / mmseg pipelines: the ``scale=(w, h)`` of the test pipeline's ``Resize`` (with
      ``keep_ratio`` the box an image is fitted into), rounded up to the data preprocessor's
      ``pad_size_divisor``, as the model receives it.
    """
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    while isinstance(dataset.get('dataset'), dict):  # dataset wrappers (RepeatDataset, ...)
        dataset = dataset['dataset']
    transform = dataset.get('transform')
    if isinstance(transform, dict) and transform.get('input_size') is not None:
        size = transform['input_size']
        return (size, size) if isinstance(size, int) else tuple(size[-2:])
    for step in dataset.get('pipeline') or []:
        if str(step.get('type', '')).split('.')[-1] == 'Resize' and step.get('scale') is not None:
            scale = step['scale']
            width, height = (scale, scale) if isinstance(scale, int) else scale
            divisor = ((cfg.get('model') or {}).get('data_preprocessor') or {}).get('pad_size_divisor') or 1
            return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor
    raise ValueError('the config names no test input size (test_dataloader.dataset.transform.input_size, or '
                     'a Resize step with a scale in the test pipeline); give the shape explicitly')


def count_config_complexity(config: str | Config, shape: Sequence[int] | None = None, cfg_options: dict | None = None,
                            backbone_only: bool = False) -> tuple[ComplexityReport, ComplexityReport | None]:
    """Complexity of the model of a config (or its backbone alone) on one ``(H, W)`` image.

    ``shape`` None takes the config's own test input size (:func:`config_test_shape`).
    Returns (model report, backbone report); the backbone report is None for ``backbone_only``,
    where the first report is the backbone's. Runs on CPU, with the model initialised from seed 0, so
    that the count is the same on every run.
    """
    cfg = read_config(config, cfg_options)
    height, width = _check_shape(config_test_shape(cfg) if shape is None else shape)
    # Seeded: a two-stage detector's count depends on how many proposals its freshly initialised RPN
    # keeps, so an unseeded build gave another total on every run. The caller's RNG state is kept.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(cfg, part='model')
    x = torch.zeros(1, 3, height, width)
    backbone = getattr(model, 'backbone', None)
    if backbone_only:
        if backbone is None:
            raise ValueError(f'{config}: the model has no backbone to count')
        return count_complexity(backbone, x), None
    wrapped = _TensorForward(model, _image_metas(height, width))
    report = count_complexity(wrapped, x)
    report.by_module = {k.removeprefix('model.'): v for k, v in report.by_module.items()}
    return report, (count_complexity(backbone, x) if backbone is not None else None)


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) != 2 or any(not is_int(s) or s <= 0 for s in shape):
        raise ValueError(f'shape must be (height, width) in pixels, got {shape!r}')
    return shape


def format_count(value: int) -> str:
    """Human-readable count: 28.3M, 4.51G."""
    if value <= 0:
        return '0'
    units = ('', 'K', 'M', 'G', 'T')
    power = min(int(math.log10(value) // 3), len(units) - 1)
    return f'{value / 1000 ** power:.3g}{units[power]}'
