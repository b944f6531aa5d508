"""The H-MaiT image classifier in timm's model interface, and its timm entry points.

``timm.create_model('hmait_tiny')`` builds :class:`HMaiTClassifier`; ``features_only=True`` gives the
stage maps of the mm backbone :class:`~hmait.models.hmait.HMaiT`, each through its own output norm.
"""
# No `from __future__ import annotations`: torch.fx copies the forward's annotations into the code it
# generates, which TorchScript must then resolve.
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .checkpoint import convert_swin_state_dict, extract_state_dict, require_local_weights, swin_layout
from .hmait import ARCH_SETTINGS, HMaiT


class HMaiTClassifier(HMaiT):
    """H-MaiT backbone + final norm (``norm{last}``) + global pooling + linear head.

    The backbone part is the same module the detection / segmentation configs use, so its
    checkpoint loads into ``HMaiT`` with the head left out. ``forward_features`` returns NHWC
    tokens (``output_fmt = 'NHWC'``), as timm's Swin does.

    Args:
        num_classes: classes of the head (0 for none). global_pool: timm pooling type.
        in_chans: timm's name for the backbone's in_channels. drop_rate: dropout before the head.
        proj_drop_rate: timm's name for the backbone's drop_rate (dropout inside the blocks).
        norm_indices: stages with an output norm ``norm{i}``; the last stage always has one (it is
            the final norm). ``features_only`` models pass every requested stage here.
        device, dtype: where and in which dtype to create the parameters.
        Other keyword arguments go to :class:`HMaiT`.
    """

    def __init__(self, num_classes: int = 1000, global_pool: str = 'avg', in_chans: int = 3,
                 drop_rate: float = 0., proj_drop_rate: float = 0., norm_indices: Sequence[int] | None = None,
                 arch: str = 'tiny', device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **kwargs):
        num_stages = len(kwargs.get('depths') or ARCH_SETTINGS[arch]['depths']) if arch in ARCH_SETTINGS else 4
        norm_indices = tuple(sorted(set(norm_indices or ()) | {num_stages - 1}))
        super().__init__(arch=arch, in_channels=in_chans, out_indices=norm_indices, drop_rate=proj_drop_rate,
                         device=device, dtype=dtype, **kwargs)
        self.in_chans = in_chans
        self.output_fmt = 'NHWC'
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.feature_dims[-1]
        self.feature_info = [dict(num_chs=c, reduction=self.patch_embed.patch_size[0] * 2 ** i, module=f'layers.{i}')
                             for i, c in enumerate(self.feature_dims)]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt='NHWC', device=device, dtype=dtype)
        if isinstance(self.head.fc, nn.Linear):
            trunc_normal_(self.head.fc.weight, std=.02)
            nn.init.zeros_(self.head.fc.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups from input to output, for timm's layer-wise learning-rate decay.

        The stem (patch embedding, position embedding) comes first. Coarse: one group per stage;
        fine: the patch merging that opens stage i, then each of its blocks. The output norms join
        the group before them (timm's ``(99999,)``), as Swin's final norm does; the head, which no
        pattern matches, goes after everything.
        """
        return dict(stem=r'^patch_embed|^absolute_pos_embed',
                    blocks=r'^layers\.(\d+)' if coarse else [(r'^layers\.(\d+)\.downsample', (0,)),
                                                            (r'^layers\.(\d+)\.blocks\.(\d+)', (1,)),
                                                            (r'^norm\d+', (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        # The new head is made where the model lives, even when the old one had no parameters.
        self.head.reset(num_classes, pool_type=global_pool, in_features=self.num_features, **get_device_dtype(self))
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> final-normed last-stage tokens ``(B, H', W', C')``."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.stage_norms[-1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's intermediate-feature API: NCHW stage maps.

        ``indices``: None for all stages, an int n for the last n, or a list of stage indices.
        ``norm``: pass each map through its stage's output norm ``norm{i}`` where it has one (the
        final norm for the last stage, as in timm's Swin; every requested stage of a
        ``features_only`` model). Returns the maps, or ``(final tokens (B, H', W', C'), maps)``;
        the final norm applies to the final tokens only when the last stage ran.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.layers), indices)
        x = self._embed(x)
        num_run = max_index + 1 if stop_early or intermediates_only else len(self.layers)
        intermediates = []
        for i, (stage, stage_norm) in enumerate(zip(self.layers[:num_run], self.stage_norms[:num_run])):
            x = stage(x)
            if i in take:
                intermediates.append((stage_norm(x) if norm else x).permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if num_run == len(self.layers):
            x = self.stage_norms[-1](x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Delete the stages after the last of ``indices`` (timm API); returns the kept indices.

        The output norms of deleted stages go with them, and with ``prune_norm`` every output norm
        does. When stages are deleted, the features end at the last kept stage, so the head
        (sized for the final features) is removed as well.
        """
        take, max_index = feature_take_indices(len(self.layers), indices)
        kept = max_index + 1
        prune_end = kept < len(self.layers)
        for i in range(len(self.layers)):
            if (i >= kept or prune_norm) and hasattr(self, f'norm{i}'):
                delattr(self, f'norm{i}')
        self.layers = self.layers[:kept]
        self.stage_norms = nn.ModuleList(getattr(self, f'norm{i}', None) or nn.Identity() for i in range(kept))
        self.stage_norms.train(self.training)
        self.out_indices = tuple(i for i in self.out_indices if hasattr(self, f'norm{i}'))
        self.frozen_stages = min(self.frozen_stages, kept)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_dims[max_index]
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take


# Tensors H-MaiT has and Swin has not: the soft-masking factors, and the output norms that a
# features_only model adds to stages other than the last.
_NOT_IN_SWIN = re.compile(r'(\.soft_mask_logit|^norm\d+\.(weight|bias))$')


def checkpoint_filter_fn(state_dict: dict, model: HMaiTClassifier) -> dict:
    """timm's ``pretrained_filter_fn``: an H-MaiT checkpoint, or a Swin one in any of the three layouts.

    Swin checkpoints are renamed by :func:`~hmait.models.checkpoint.convert_swin_state_dict`, with
    the window tensors dropped. Tensors Swin has no counterpart for keep the model's initialisation.
    """
    state_dict = extract_state_dict(state_dict)
    if swin_layout(state_dict) is not None:
        state_dict, _ = convert_swin_state_dict(state_dict, num_stages=len(model.layers))
    for key, value in model.state_dict().items():
        if key not in state_dict and _NOT_IN_SWIN.search(key):
            state_dict[key] = value
    return state_dict


def _cfg(**kwargs) -> dict:
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.9,
            'interpolation': 'bicubic', 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
            'first_conv': 'patch_embed.proj', 'classifier': 'head.fc', 'license': 'apache-2.0', **kwargs}


# No published weights: pretrained=True needs pretrained_cfg_overlay=dict(file=LOCAL_PATH), which may
# also be a Swin checkpoint of the same size (swin_tiny_patch4_window7_224 for hmait_tiny).
default_cfgs = generate_default_cfgs({name: _cfg() for name in ('hmait_tiny', 'hmait_small', 'hmait_base')})


def _create_hmait(variant: str, arch: str, pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    require_local_weights(variant, pretrained, kwargs)
    feature_cfg = None
    if kwargs.get('features_only'):
        # Every requested stage gets its own output norm, exactly as in the mm backbone.
        out_indices = tuple(kwargs.get('out_indices', (0, 1, 2, 3)))
        kwargs.update(out_indices=out_indices, norm_indices=out_indices, feature_cls='getter')
        feature_cfg = dict(norm=True)
    return build_model_with_cfg(HMaiTClassifier, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, arch=arch, **kwargs)


@register_model
def hmait_tiny(pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    """H-MaiT-T: Swin-T shape, masked heads (3, 6, 4, 0) (paper section 5.4)."""
    return _create_hmait('hmait_tiny', 'tiny', pretrained, **{'drop_path_rate': 0.2, **kwargs})


@register_model
def hmait_small(pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    """H-MaiT-S: Swin-S shape, masked heads (3, 6, 4, 0) (paper section 5.4)."""
    return _create_hmait('hmait_small', 'small', pretrained, **{'drop_path_rate': 0.3, **kwargs})


@register_model
def hmait_base(pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    """H-MaiT-B: Swin-B shape, masked heads (4, 8, 5, 0): proportional masking, not from the paper."""
    return _create_hmait('hmait_base', 'base', pretrained, **{'drop_path_rate': 0.5, **kwargs})
