"""Top-k accuracy as an mmengine metric."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from mmengine.evaluator import BaseMetric


class TopKAccuracy(BaseMetric):
    """Percentage of samples whose label is among the k highest scores, for each k in ``topk``.

    Reports ``accuracy/top1``, ``accuracy/top5`` (with the default prefix). When k is larger than
    the number of classes every sample counts as a hit. Expects the classifier's 'predict' outputs:
    dicts with ``pred_score`` (num_classes,) and ``gt_label``.
    """

    default_prefix = 'accuracy'

    def __init__(self, topk: Sequence[int] = (1, 5), collect_device: str = 'cpu', prefix: str | None = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        topk = tuple(topk)
        if not topk or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in topk):
            raise ValueError(f'topk must be positive integers, got {topk!r}')
        self.topk = topk

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            scores = torch.as_tensor(sample['pred_score'])
            label = int(sample['gt_label'])
            ranked = scores.topk(min(max(self.topk), scores.numel())).indices.tolist()
            # Keep only the hits: tiny results to gather across ranks.
            self.results.append(tuple(label in ranked[:k] for k in self.topk))

    def compute_metrics(self, results: list) -> dict:
        if not results:
            raise ValueError('TopKAccuracy got no samples: is the validation set empty?')
        hits = torch.tensor(results, dtype=torch.float64)
        return {f'top{k}': float(hits[:, i].mean() * 100) for i, k in enumerate(self.topk)}
