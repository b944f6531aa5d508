"""Attention Locality Score (paper section 4.2, Eq. 3) of every head of a MaiT or H-MaiT model.

For a patch token n, ``ALS_n = sum_i (M * A)_{n,i}``: the attention mass that falls on its
``mask_size x mask_size`` neighbourhood (self included), where A is the head's attention map as
the model computes it (masked for masked heads, plain softmax for global heads) and M is the
neighbourhood mask. A head's ALS is the mean over patch tokens (prefix tokens attend globally by
design and are left out), averaged over the images.

Every ``MaskedMultiheadAttention`` of the model is one "layer"; for H-MaiT those are the blocks of
all stages in order. The analysis only reads the model: it captures each attention module's input
with a forward pre-hook and recomputes that module's dense maps with
``MaskedMultiheadAttention.attention_maps``; the hooks are removed and every module's train/eval
flag is restored afterwards.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..models.layers import MaskedMultiheadAttention
from ..ops import neighbourhood_mask

# Dense maps of one layer are computed for as many images at once as fit in this many bytes.
DEFAULT_MAX_MAP_BYTES = 256 << 20


def attention_layers(model: nn.Module) -> list[tuple[str, MaskedMultiheadAttention]]:
    """``(name, module)`` of every masked-attention module of ``model``, in forward order.

    Raises ValueError when there is none: the analysis needs the attention of a MaiT / H-MaiT model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'model must be a torch.nn.Module, got {type(model).__name__}')
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedMultiheadAttention)]
    if not layers:
        raise ValueError(f'model {type(model).__name__} has no attention layers (no MaskedMultiheadAttention '
                         f'module); attention analysis needs a MaiT or H-MaiT model')
    return layers


def head_als(maps: torch.Tensor, hw: tuple[int, int], mask_size: int = 3,
             num_prefix_tokens: int = 0) -> torch.Tensor:
    """ALS of each head from dense attention maps.

    Args:
        maps: attention maps ``(B, heads, N, N)`` with ``N = num_prefix_tokens + h*w``, rows summing to 1.
        hw: the token grid ``(h, w)``.

    Returns:
        ``(B, heads)``: per image, the mean over patch tokens of the attention mass on the neighbourhood.
    """
    h, w = hw
    n = num_prefix_tokens + h * w
    if maps.dim() != 4 or maps.shape[-1] != n or maps.shape[-2] != n:
        raise ValueError(f'maps must have shape (B, heads, N, N) with N = num_prefix_tokens + h*w = {n}, '
                         f'got {tuple(maps.shape)}')
    mask = neighbourhood_mask(h, w, mask_size, num_prefix_tokens, device=maps.device)
    local = maps.masked_fill(~mask, 0.).sum(dim=-1)            # (B, heads, N): ALS_n
    return local[:, :, num_prefix_tokens:].mean(dim=-1)


def _split_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple[int, int]]:
    x = args[0] if args else kwargs['x']
    hw = args[1] if len(args) > 1 else kwargs['hw']
    return x, tuple(int(s) for s in hw)


def map_chunks(module: MaskedMultiheadAttention, x: torch.Tensor, hw: tuple[int, int],
               max_map_bytes: int = DEFAULT_MAX_MAP_BYTES) -> Iterator[torch.Tensor]:
    """Dense attention maps of ``module`` for the input ``x`` ``(B, N, dim)``, a few images at a time.

    Yields ``(b, heads, N, N)`` chunks along the batch, each at most about ``max_map_bytes`` in
    float32 (at least one image), so stage-1 H-MaiT maps (N = 3136 at 224 px) stay bounded.
    """
    n = x.shape[1]
    per_image = module.num_heads * n * n * 4
    step = max(1, int(max_map_bytes // per_image))
    for start in range(0, x.shape[0], step):
        yield module.attention_maps(x[start:start + step], hw)


@contextmanager
def attention_inputs(model: nn.Module, callback: Callable[[int, MaskedMultiheadAttention, torch.Tensor,
                                                           tuple[int, int]], None]) -> Iterator[list]:
    """Within the context, every forward of ``model`` calls ``callback(layer_index, module, x, hw)``
    with each attention module's input ``x`` ``(B, N, dim)``; the model runs in eval mode without
    gradients. Yields the :func:`attention_layers` list. The model is left as it was.
    """
    layers = attention_layers(model)
    modes = {m: m.training for m in model.modules()}
    handles = []

    def make_hook(index: int) -> Callable:
        def hook(module, args, kwargs):
            x, hw = _split_inputs(args, kwargs)
            callback(index, module, x, hw)
        return hook

    try:
        for index, (_, module) in enumerate(layers):
            handles.append(module.register_forward_pre_hook(make_hook(index), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            yield layers
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training


def image_batches(images: torch.Tensor | Iterable) -> Iterator[torch.Tensor]:
    """Image tensors ``(B, C, H, W)`` from a tensor, or from an iterable of tensors / ``(tensor, label)``."""
    if isinstance(images, torch.Tensor):
        images = [images]
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f'images must be (B, C, H, W) tensors or batches (images, labels), got {shape}')
        yield batch


@dataclass
class ALSResult:
    """ALS per layer and head.

    ``scores[l][h]`` is head h of layer ``layers[l]``; heads 0 .. masked_heads[l]-1 are the masked
    ones (in ``mask_modes[l]``). ``alpha`` maps a layer name to the learned soft-masking factors of
    its masked heads (soft layers only). ``tokens[l]`` is the grid size ``h*w`` seen by layer l.
    """

    layers: list[str]
    num_heads: list[int]
    masked_heads: list[int]
    mask_modes: list[str]
    mask_sizes: list[int]
    tokens: list[int]
    scores: list[list[float]]
    num_images: int
    alpha: dict[str, list[float]] = field(default_factory=dict)

    def head0(self) -> list[float]:
        """ALS of head 0 of every layer (the head the quick search masks first)."""
        return [s[0] for s in self.scores]

    def layer_mean(self) -> list[float]:
        return [sum(s) / len(s) for s in self.scores]

    def to_dict(self) -> dict:
        return asdict(self)


def soft_alphas(model: nn.Module) -> dict[str, list[float]]:
    """Learned soft-masking factors alpha of every soft layer: ``{layer name: [alpha per masked head]}``."""
    return {name: [float(a) for a in m.alpha.detach().cpu()]
            for name, m in attention_layers(model) if m.alpha is not None}


def compute_als(model: nn.Module, images: torch.Tensor | Iterable,
                max_map_bytes: int = DEFAULT_MAX_MAP_BYTES) -> ALSResult:
    """ALS of every head of every attention layer of ``model``, averaged over ``images``.

    Args:
        model: any module built from ``MaskedMultiheadAttention`` (MaiT, H-MaiT, their backbones).
        images: a ``(B, C, H, W)`` tensor, or an iterable (e.g. a DataLoader) of such tensors or
            of ``(images, labels)`` batches. Images go through the model's ``forward`` as they are.
        max_map_bytes: memory bound of the dense attention maps computed at once.
    """
    layers = attention_layers(model)
    sums: list[torch.Tensor | None] = [None] * len(layers)
    tokens: list[int] = [0] * len(layers)

    def accumulate(index: int, module: MaskedMultiheadAttention, x: torch.Tensor,
                   hw: tuple[int, int]) -> None:
        total = torch.zeros(module.num_heads, dtype=torch.float64)
        for maps in map_chunks(module, x, hw, max_map_bytes):
            total += head_als(maps, hw, module.mask_size, module.num_prefix_tokens).double().sum(0).cpu()
        sums[index] = total if sums[index] is None else sums[index] + total
        tokens[index] = hw[0] * hw[1]

    num_images = 0
    with attention_inputs(model, accumulate):
        for batch in image_batches(images):
            model(batch)
            num_images += batch.shape[0]
    if num_images == 0:
        raise ValueError('images is empty: ALS needs at least one image')
    missing = [name for (name, _), s in zip(layers, sums) if s is None]
    if missing:
        raise RuntimeError(f'the forward pass never reached the attention layers {missing}')
    modules = [m for _, m in layers]
    return ALSResult(layers=[name for name, _ in layers], num_heads=[m.num_heads for m in modules],
                     masked_heads=[m.num_masked_heads for m in modules],
                     mask_modes=[m.mode if m.num_masked_heads else 'none' for m in modules],
                     mask_sizes=[m.mask_size for m in modules], tokens=tokens,
                     scores=[[float(v) / num_images for v in s] for s in sums], num_images=num_images,
                     alpha=soft_alphas(model))


def als_matrix(result: ALSResult) -> torch.Tensor:
    """``(layers, max heads)`` float tensor of the scores, NaN where a layer has fewer heads (H-MaiT)."""
    width = max(result.num_heads)
    out = torch.full((len(result.layers), width), math.nan)
    for i, row in enumerate(result.scores):
        out[i, :len(row)] = torch.tensor(row)
    return out
