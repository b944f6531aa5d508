"""The H-MaiT image classifier, in timm's model interface (``timm.create_model('hmait_tiny')``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, trunc_normal_

from .hmait import ARCH_SETTINGS, HMaiT


class HMaiTClassifier(HMaiT):
    """H-MaiT backbone + final norm (``norm{last}``) + global pooling + linear head.

    The backbone part is the same module the detection / segmentation configs use, so its
    checkpoint loads into ``HMaiT`` with the head left out.

    Args:
        num_classes: classes of the head (0 for none). global_pool: timm pooling type.
        in_chans: timm's name for the backbone's in_channels. drop_rate: dropout before the head.
        proj_drop_rate: timm's name for the backbone's drop_rate (dropout inside the blocks).
        norm_indices: stages with an output norm ``norm{i}``; the last stage always has one (it is
            the final norm). ``features_only`` models pass every requested stage here.
        Other keyword arguments go to :class:`HMaiT`.
    """

    def __init__(self, num_classes: int = 1000, global_pool: str = 'avg', in_chans: int = 3,
                 drop_rate: float = 0., proj_drop_rate: float = 0., norm_indices: Sequence[int] | None = None,
                 arch: str = 'tiny', **kwargs):
        num_stages = len(kwargs.get('depths') or ARCH_SETTINGS[arch]['depths']) if arch in ARCH_SETTINGS else 4
        norm_indices = tuple(sorted(set(norm_indices or ()) | {num_stages - 1}))
        super().__init__(arch=arch, in_channels=in_chans, out_indices=norm_indices, drop_rate=proj_drop_rate,
                         **kwargs)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.feature_dims[-1]
        self.feature_info = [dict(num_chs=c, reduction=self.patch_embed.patch_size[0] * 2 ** i, module=f'layers.{i}')
                             for i, c in enumerate(self.feature_dims)]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC')
        if isinstance(self.head.fc, nn.Linear):
            trunc_normal_(self.head.fc.weight, std=.02)
            nn.init.zeros_(self.head.fc.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> final-normed last-stage tokens ``(B, H', W', C')``."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return getattr(self, f'norm{len(self.layers) - 1}')(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's intermediate-feature API: NCHW stage maps, each through ``norm{i}`` where it exists.

        ``indices``: None for all stages, an int n for the last n, or a list of stage indices.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        num_stages = len(self.layers)
        if indices is None:
            take = list(range(num_stages))
        elif isinstance(indices, int):
            take = list(range(num_stages - indices, num_stages))
        else:
            take = [i % num_stages for i in indices]
        if any(not 0 <= i < num_stages for i in take):
            raise ValueError(f'indices must select stages in [0, {num_stages - 1}], got {indices!r}')
        if intermediates_only:
            return self._stage_outputs(x, take)
        maps = self._stage_outputs(x, sorted(set(take) | {num_stages - 1}))
        final = maps[-1].permute(0, 2, 3, 1)
        return final, [m for i, m in zip(sorted(set(take) | {num_stages - 1}), maps) if i in take]

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        num_stages = len(self.layers)
        take = list(range(num_stages - indices, num_stages)) if isinstance(indices, int) else list(indices)
        if prune_head:
            self.reset_classifier(0, '')
        return take
