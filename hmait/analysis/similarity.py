"""Cross-layer attention similarity (paper appendix A.2, Eq. 4, after DeepViT).

``M^{i,j}_{h,t}`` is the cosine similarity between row t of head h's attention map in layer i and
the same row in layer j. We average it over all query tokens t (class / distillation tokens
included: Eq. 4 runs over the N+1 tokens) and over the images, giving a layer x layer matrix for
one head. Layers whose token counts differ (H-MaiT stages) have no row-to-row correspondence;
those entries, and layers that do not have head h, are NaN.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers import MaskedMultiheadAttention
from ..ops.checks import check_int
from .als import DEFAULT_MAX_MAP_BYTES, attention_inputs, attention_layers, image_batches, map_chunks


@dataclass
class SimilarityResult:
    """``matrix[i][j]``: mean cosine similarity of head ``head``'s attention rows in layers i and j."""

    layers: list[str]
    head: int
    tokens: list[int]
    matrix: list[list[float]]
    num_images: int

    def to_dict(self) -> dict:
        return dict(layers=self.layers, head=self.head, tokens=self.tokens, num_images=self.num_images,
                    matrix=[[None if math.isnan(v) else v for v in row] for row in self.matrix])


def layer_similarity(model: nn.Module, images: torch.Tensor | Iterable, head: int = 0,
                     max_map_bytes: int = DEFAULT_MAX_MAP_BYTES) -> SimilarityResult:
    """Layer x layer attention similarity of ``head`` over ``images`` (see the module docstring).

    Args:
        model: any module built from ``MaskedMultiheadAttention`` (MaiT, H-MaiT).
        images: a ``(B, C, H, W)`` tensor or an iterable of such tensors / ``(images, labels)`` batches.
        head: head index; it must exist in at least one layer.
    """
    layers = attention_layers(model)
    check_int('head', head, minimum=0)
    most = max(m.num_heads for _, m in layers)
    if head >= most:
        raise ValueError(f'head={head} does not exist: the model\'s layers have at most {most} heads')
    count = len(layers)
    sums = torch.zeros(count, count, dtype=torch.float64)
    tokens = [0] * count
    rows: list[torch.Tensor | None] = [None] * count  # unit-norm attention rows of this batch, (B, N, N)

    def capture(index: int, module: MaskedMultiheadAttention, x: torch.Tensor, hw: tuple[int, int]) -> None:
        tokens[index] = x.shape[1]
        if head >= module.num_heads:
            return
        chunks = [F.normalize(maps[:, head].float(), dim=-1)
                  for maps in map_chunks(module, x, hw, max_map_bytes)]
        rows[index] = torch.cat(chunks)

    num_images = 0
    with attention_inputs(model, capture):
        for batch in image_batches(images):
            rows[:] = [None] * count
            model(batch)
            num_images += batch.shape[0]
            for i in range(count):
                for j in range(i, count):
                    if rows[i] is None or rows[j] is None or rows[i].shape != rows[j].shape:
                        continue
                    # Mean over query tokens of the row cosine similarity, summed over images.
                    value = (rows[i] * rows[j]).sum(-1).mean(-1).double().sum().cpu()
                    sums[i, j] += value
                    if i != j:
                        sums[j, i] += value
    if num_images == 0:
        raise ValueError('images is empty: the similarity needs at least one image')
    matrix = sums / num_images
    for i, (_, mi) in enumerate(layers):
        for j, (_, mj) in enumerate(layers):
            if head >= mi.num_heads or head >= mj.num_heads or tokens[i] != tokens[j]:
                matrix[i, j] = math.nan
    return SimilarityResult(layers=[name for name, _ in layers], head=head, tokens=tokens,
                            matrix=matrix.tolist(), num_images=num_images)
