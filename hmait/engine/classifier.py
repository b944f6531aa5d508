"""The mmengine image classifier: a timm model plus timm's Mixup/CutMix and losses."""
from __future__ import annotations

import torch
import torch.nn as nn
from mmengine.model import BaseModel
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..builder import create_timm_model


class TimmImageClassifier(BaseModel):
    """Wraps ``timm.create_model(model_name, num_classes=..., **model_kwargs)`` as ``self.backbone``.

    The wrapped module is exactly the timm model (for H-MaiT: ``HMaiTClassifier``), so checkpoint
    keys read ``backbone.layers...`` and load into the detection/segmentation ``HMaiT`` backbone
    once the ``backbone.`` prefix is stripped.

    Args:
        model_name: a timm model name, e.g. 'hmait_tiny' (``import hmait`` registers those).
        num_classes: classes of the head.
        model_kwargs: further ``timm.create_model`` arguments (drop_path_rate, depths, ...).
        mixup: keyword arguments of ``timm.data.Mixup`` (mixup_alpha, cutmix_alpha, prob, ...)
            or None for no mixing. With mixing the loss is timm's ``SoftTargetCrossEntropy`` and the
            label smoothing is applied by Mixup to the mixed targets.
        label_smoothing: smoothing of the targets; without Mixup the loss is timm's
            ``LabelSmoothingCrossEntropy`` (plain cross-entropy when 0).

    ``forward(inputs (B, 3, H, W), data_samples (B,) labels, mode)``: 'loss' -> dict(loss=...),
    'predict' -> one dict(pred_score=(num_classes,), gt_label=int) per sample, 'tensor' -> logits.
    """

    def __init__(self, model_name: str, num_classes: int = 1000, model_kwargs: dict | None = None,
                 mixup: dict | None = None, label_smoothing: float = 0.0, data_preprocessor: dict | None = None,
                 init_cfg: dict | None = None):
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f'label_smoothing must lie in [0, 1), got {label_smoothing!r}')
        self.backbone = create_timm_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
        self.num_classes = num_classes
        mixing = bool(mixup) and (mixup.get('mixup_alpha', 1.0) > 0 or mixup.get('cutmix_alpha', 0.0) > 0
                                  or mixup.get('cutmix_minmax') is not None) and mixup.get('prob', 1.0) > 0
        self.mixup = Mixup(**{**mixup, 'num_classes': num_classes, 'label_smoothing': label_smoothing}) \
            if mixing else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def forward(self, inputs: torch.Tensor, data_samples: torch.Tensor | None = None,
                mode: str = 'tensor') -> dict | list | torch.Tensor:
        if mode == 'tensor':
            return self.backbone(inputs)
        if data_samples is None:
            raise ValueError(f"mode={mode!r} needs data_samples (the labels, shape (B,))")
        labels = torch.as_tensor(data_samples, device=inputs.device).long()
        if mode == 'loss':
            if self.mixup is not None:
                if inputs.shape[0] % 2:
                    raise ValueError(f'Mixup/CutMix pairs samples and needs an even batch, got {inputs.shape[0]}: '
                                     'use an even batch_size and drop_last=True in train_dataloader')
                inputs, targets = self.mixup(inputs, labels)
            else:
                targets = labels
            return dict(loss=self.criterion(self.backbone(inputs), targets))
        if mode == 'predict':
            scores = self.backbone(inputs).float().softmax(dim=-1)
            return [dict(pred_score=s, gt_label=int(y)) for s, y in zip(scores, labels)]
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")
