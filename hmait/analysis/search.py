"""One step of the quick empirical mask search (paper section 4.3).

The search alternates training and measuring:

1. Initialisation: one masked head (head 0) in every layer; train.
2. Assignment (:func:`assign_masks`), from head 0's ALS of every layer:
   above ``upper`` (0.65) -> mask every head of the layer; from ``lower`` (0.35) to ``upper``
   inclusive -> keep the one mask; below ``lower`` -> remove it. Train again.
3. Calibration (:func:`calibrate_masks`), for the layers that step 2 fully masked: keep the mask
   of every head whose ALS is at least ``lower``, remove the others. Other layers keep their count.

Masks always sit on the first heads of a layer (``MaskedMultiheadAttention`` masks heads
0 .. k-1), and every step is followed by training from scratch, so a step's result is a count of
masked heads per layer, not a choice of head indices.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .als import ALSResult

UPPER = 0.65
LOWER = 0.35
STAGES = ('auto', 'assign', 'calibrate')


def _check_thresholds(upper: float, lower: float) -> None:
    if not 0. <= lower <= upper <= 1.:
        raise ValueError(f'thresholds must satisfy 0 <= lower <= upper <= 1, '
                         f'got lower={lower!r}, upper={upper!r}')


def assign_masks(head0_als: Sequence[float], num_heads: Sequence[int], upper: float = UPPER,
                 lower: float = LOWER) -> list[int]:
    """Step 2: masked heads per layer from head 0's ALS of each layer (thresholds as in the module doc)."""
    _check_thresholds(upper, lower)
    if len(head0_als) != len(num_heads):
        raise ValueError(f'head0_als has {len(head0_als)} layers but num_heads has {len(num_heads)}')
    return [heads if als > upper else 1 if als >= lower else 0 for als, heads in zip(head0_als, num_heads)]


def calibrate_masks(head_als: Sequence[Sequence[float]], masked_heads: Sequence[int],
                    lower: float = LOWER) -> list[int]:
    """Step 3: in every fully masked layer, keep the masks of heads with ALS >= ``lower``.

    ``head_als[l]`` holds the ALS of every head of layer l; ``masked_heads[l]`` is its current count.
    Layers that are not fully masked keep their count.
    """
    if not 0. <= lower <= 1.:
        raise ValueError(f'lower threshold must lie in [0, 1], got {lower!r}')
    if len(head_als) != len(masked_heads):
        raise ValueError(f'head_als has {len(head_als)} layers but masked_heads has {len(masked_heads)}')
    out = []
    for scores, masked in zip(head_als, masked_heads):
        full = masked == len(scores) and masked > 0
        out.append(sum(1 for s in scores if s >= lower) if full else masked)
    return out


@dataclass
class SearchStep:
    """Result of :func:`search_step`: the new masked heads per layer and why."""

    stage: str
    layers: list[str]
    before: list[int]
    masked_heads: list[int]
    reasons: list[str]
    upper: float
    lower: float


def search_step(als: ALSResult, upper: float = UPPER, lower: float = LOWER,
                stage: str = 'auto') -> SearchStep:
    """The next masking from the ALS of a model trained with the current masking.

    ``stage='auto'`` assigns when the model is still in the initial state (at most one masked head
    in every layer) and calibrates otherwise.
    """
    if stage not in STAGES:
        raise ValueError(f'stage must be one of {STAGES}, got {stage!r}')
    _check_thresholds(upper, lower)
    if stage == 'auto':
        stage = 'assign' if max(als.masked_heads) <= 1 else 'calibrate'
    head0 = als.head0()
    if stage == 'assign':
        new = assign_masks(head0, als.num_heads, upper, lower)
        reasons = []
        for a, n, h in zip(head0, new, als.num_heads):
            why = '> upper: mask all heads' if n == h and a > upper else '< lower: no mask' if n == 0 \
                else 'in [lower, upper]: one mask'
            reasons.append(f'head-0 ALS {a:.3f} {why}')
    else:
        new = calibrate_masks(als.scores, als.masked_heads, lower)
        reasons = []
        for scores, before, after in zip(als.scores, als.masked_heads, new):
            if before == len(scores) and before > 0:
                shown = ', '.join(f'{s:.3f}' for s in scores)
                reasons.append(f'fully masked, head ALS [{shown}]: keep {after} with ALS >= lower')
            else:
                reasons.append('not fully masked: unchanged')
    return SearchStep(stage=stage, layers=list(als.layers), before=list(als.masked_heads), masked_heads=new,
                      reasons=reasons, upper=upper, lower=lower)
