"""MaiT: the monolithic (DeiT-style) vision transformer with masked attention heads (paper section 5).

A 16x16 patch embedding, a class token (and optionally DeiT's distillation token), an absolute
position embedding and a stack of :class:`~hmait.models.layers.MaskedAttentionBlock` whose first
``masked_heads[l]`` heads are masked in layer ``l``. Class and distillation tokens are prefix tokens
of the masked attention: they attend to every token and every token attends to them.

Parameter names follow timm's ``VisionTransformer`` (``cls_token``, ``pos_embed``, ``blocks.{i}``,
``norm``, ``head``, ``head_dist``), so DeiT checkpoints load onto MaiT without renaming.
"""
# No `from __future__ import annotations`: torch.fx copies the forward's annotations into the code it
# generates, which TorchScript must then resolve.
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, get_device_dtype, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..ops.checks import MASK_MODES, check_image, check_masked_heads, check_mode, check_positive_int, is_int
from .checkpoint import require_local_weights
from .layers import MaskedAttentionBlock

# torch.fx records the input check as one call: it compares traced shapes.
torch.fx.wrap('check_image')

# The paper's named masking schemes (section 5.3) are defined for 24 layers.
SCHEME_DEPTH = 24
SCHEMES = ('sch1', 'sch2', 'sch3')


def masking_scheme(name: str, depth: int, num_heads: int) -> tuple[list[int], list[str]]:
    """Masked heads and mask mode per layer of a named scheme of paper section 5.3.

    * ``'sch1'``: one hard-masked head in every layer (any depth).
    * ``'sch2'``: ``num_heads - 1`` hard-masked heads in layers 0-7, one in layers 8-19, none in
      20-23. The paper's text says "Layer 9-19" for the middle group, which would leave layer 8 out
      of every group; we read it as 8-19.
    * ``'sch3'``: soft masking in layers 0-20, none in 21-23. Soft masking is a per-head factor
      alpha (paper section 4.3, "a learnable scale factor for each attention head"), so we read
      "soft masking for a layer" as every head of that layer soft-masked (``mask_mode='soft'``);
      heads that should be global learn alpha -> 1.

    Returns ``(masked_heads, mask_modes)``, two lists of length ``depth``.
    """
    if name not in SCHEMES:
        raise ValueError(f'masking scheme must be one of {SCHEMES}, got {name!r}')
    if name == 'sch1':
        return [1] * depth, ['hard'] * depth
    if depth != SCHEME_DEPTH:
        raise ValueError(f"masking scheme {name!r} is defined for {SCHEME_DEPTH} layers (paper section 5.3), "
                         f'got depth={depth}; give masked_heads as a list with one count per layer instead')
    if name == 'sch2':
        return [num_heads - 1] * 8 + [1] * 12 + [0] * 4, ['hard'] * depth
    return [num_heads] * 21 + [0] * 3, ['soft'] * 21 + ['hard'] * 3


def _resolve_masking(masked_heads: int | Sequence[int] | str, mask_mode: str | Sequence[str] | None,
                     depth: int, num_heads: int) -> tuple[list[int], list[str]]:
    """Per-layer masked-head counts and modes from the constructor arguments (validated here)."""
    scheme_modes = None
    if isinstance(masked_heads, str):
        masked_heads, scheme_modes = masking_scheme(masked_heads, depth, num_heads)
    elif is_int(masked_heads):
        masked_heads = [masked_heads] * depth
    elif isinstance(masked_heads, Sequence):
        masked_heads = list(masked_heads)
        if len(masked_heads) != depth:
            raise ValueError(f'masked_heads must have one entry per layer (depth={depth}), '
                             f'got {len(masked_heads)} entries: {masked_heads!r}')
    else:
        raise ValueError(f'masked_heads must be an int, a list of ints (one per layer) or a scheme name '
                         f'{SCHEMES}, got {masked_heads!r}')
    for i, count in enumerate(masked_heads):
        check_masked_heads(count, num_heads, name=f'masked_heads[{i}]')

    if mask_mode is None:
        modes = scheme_modes or ['hard'] * depth
    else:
        modes = [mask_mode] * depth if isinstance(mask_mode, str) else list(mask_mode)
        if len(modes) != depth:
            raise ValueError(f'mask_mode must be one of {MASK_MODES} or a list of one per layer (depth={depth}), '
                             f'got {mask_mode!r}')
        for i, mode in enumerate(modes):
            check_mode(mode, name=f'mask_mode[{i}]')
        if scheme_modes is not None:
            clash = [i for i, (m, s, c) in enumerate(zip(modes, scheme_modes, masked_heads)) if c and m != s]
            if clash:
                raise ValueError(f'mask_mode={mask_mode!r} contradicts the named scheme, which uses '
                                 f'{scheme_modes[clash[0]]!r} in layer {clash[0]}; leave mask_mode unset '
                                 f'with a named scheme')
    return masked_heads, modes


class MaiT(nn.Module):
    """Monolithic MaiT classifier in timm's model interface.

    Args:
        img_size: training image size; the position embedding is resampled for other sizes.
        patch_size: patch side (16 in the paper). in_chans: input channels.
        num_classes: classes of the head (0 for none). global_pool: 'token' (class token, DeiT) or
            'avg' (mean of the patch tokens).
        embed_dim, depth, num_heads: D, number of layers and H (paper Table 2).
        masked_heads: masked heads per layer: an int for every layer, a list with one count per
            layer, or a named scheme 'sch1', 'sch2', 'sch3' (see :func:`masking_scheme`).
        mask_mode: 'hard', 'soft' or 'strict', or one per layer; None takes the scheme's modes
            ('hard' for counts).
        mask_size: side of the square mask (odd, 3 in the paper).
        alpha_init: initial soft-masking factor of soft heads.
        layer_scale_init: LayerScale initial value (CaiT); None disables LayerScale.
        distilled: add DeiT's distillation token and a second head ``head_dist``.
        drop_path_rate: stochastic depth; linear over the layers unless ``drop_path_uniform``
            (the constant rate of CaiT, used for MaiT-S in paper Table 8).
        device, dtype: where and in which dtype to create the parameters.
        Others as in timm's ``VisionTransformer``.

    Forward: ``(B, in_chans, H, W)`` with H, W multiples of ``patch_size`` -> logits ``(B, num_classes)``
    (a pair of logits when ``distilled`` and ``distilled_training`` while training).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = 'token', embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, masked_heads: int | Sequence[int] | str = 1,
                 mask_mode: str | Sequence[str] | None = None, mask_size: int = 3, alpha_init: float = 0.5,
                 mlp_ratio: float = 4., qkv_bias: bool = True, layer_scale_init: float | None = None,
                 distilled: bool = False, drop_rate: float = 0., pos_drop_rate: float = 0.,
                 proj_drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.,
                 drop_path_uniform: bool = False, with_cp: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        for name, value in (('embed_dim', embed_dim), ('depth', depth), ('num_heads', num_heads),
                            ('patch_size', patch_size), ('in_chans', in_chans)):
            check_positive_int(name, value)
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})')
        if global_pool not in ('token', 'avg'):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if layer_scale_init is not None and not layer_scale_init > 0:
            raise ValueError(f'layer_scale_init must be positive or None (no LayerScale), '
                             f'got {layer_scale_init!r}')
        self.masked_heads, self.mask_modes = _resolve_masking(masked_heads, mask_mode, depth, num_heads)

        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.distilled = distilled
        self.num_prefix_tokens = 2 if distilled else 1
        # timm's distillation training hook: when set (and training) the forward returns both heads' logits.
        self.distilled_training = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, output_fmt='NHWC', strict_img_size=False, **dd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if distilled else None
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_patches, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # Plain Python so that the model also builds under a meta-device context (shape-only builds).
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            MaskedAttentionBlock(embed_dim, num_heads, num_masked_heads=self.masked_heads[i],
                                 mask_size=mask_size, mask_mode=self.mask_modes[i], mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, drop=proj_drop_rate, attn_drop=attn_drop_rate,
                                 drop_path=rates[i], layer_scale_init=layer_scale_init,
                                 num_prefix_tokens=self.num_prefix_tokens, with_cp=with_cp,
                                 alpha_init=alpha_init, **dd)
            for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()) \
            if distilled else None
        reduction = self.patch_embed.patch_size[0]
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction)
                             for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        """DeiT's initialisation: truncated-normal tokens, position embedding and linears."""
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        if self.dist_token is not None:
            trunc_normal_(self.dist_token, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed', 'cls_token', 'dist_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups from input to output, for timm's layer-wise learning-rate decay: the
        embeddings and prefix tokens, then each block; the final norm joins the last block's group
        (timm's ``(99999,)``), and the heads, matched by no pattern, go after everything."""
        return dict(stem=r'^cls_token|^dist_token|^pos_embed|^patch_embed',
                    blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ('token', 'avg'):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        # The new heads are made where the model lives, even when the old ones had no parameters.
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        if self.distilled:
            self.head_dist = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
            self.head_dist.train(self.training)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for block in self.blocks:
            block.with_cp = enable

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, in_chans, H, W)`` -> tokens ``(B, P + h*w, D)`` with position embedding, and ``(h, w)``."""
        check_image(x, self.in_chans, 'in_chans')
        x = self.patch_embed(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(b, -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        # timm's resampling returns the embedding itself at the training grid, and is one torch.fx call.
        pos = resample_abs_pos_embed(self.pos_embed, [h, w], [self.patch_embed.grid_size[0],
                                                              self.patch_embed.grid_size[1]],
                                     num_prefix_tokens=self.num_prefix_tokens)
        return self.pos_drop(x + pos), (h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> normalised tokens ``(B, P + h*w, D)``, prefix tokens first."""
        x, hw = self._embed(x)
        for block in self.blocks:
            x = block(x, hw)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, P + N, D)`` -> logits ``(B, num_classes)``, or pooled features with ``pre_logits``."""
        if self.head_dist is None:  # not distilled (a static branch for TorchScript)
            pooled = x[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == 'avg' else x[:, 0]
            pooled = self.head_drop(pooled)
            return pooled if pre_logits else self.head(pooled)
        if self.global_pool == 'avg':
            pooled = pooled_dist = x[:, self.num_prefix_tokens:].mean(dim=1)
        else:
            pooled, pooled_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (pooled + pooled_dist) / 2
        logits, logits_dist = self.head(self.head_drop(pooled)), self.head_dist(self.head_drop(pooled_dist))
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return logits, logits_dist
        # DeiT's inference: the mean of the class and distillation heads.
        return (logits + logits_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """timm's intermediate-feature API.

        ``indices``: None for every layer, an int n for the last n, or a list of layer indices.
        Intermediates are patch tokens as ``(B, D, h, w)`` (``'NCHW'``) or ``(B, h*w, D)`` (``'NLC'``);
        with ``return_prefix_tokens`` each is a pair (patch tokens, prefix tokens ``(B, P, D)``).
        Returns the intermediates, or ``(final normalised tokens, intermediates)``; with ``stop_early``
        the "final" tokens are those after the last requested layer.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        x, (h, w) = self._embed(x)
        blocks = self.blocks[:max_index + 1] if stop_early or intermediates_only else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = block(x, (h, w))
            if i in take:
                y = self.norm(x) if norm else x
                prefix, patches = y[:, :self.num_prefix_tokens], y[:, self.num_prefix_tokens:]
                if output_fmt == 'NCHW':
                    patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
                intermediates.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last index in ``indices`` (timm API); returns the kept indices."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take


def _cfg(**kwargs) -> dict:
    return {'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875,
            'interpolation': 'bicubic', 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
            'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0', **kwargs}


# No published weights: pretrained=True needs pretrained_cfg_overlay=dict(file=LOCAL_PATH).
default_cfgs = generate_default_cfgs({name: _cfg()
                                      for name in ('mait_xtiny', 'mait_tiny', 'mait_xsmall', 'mait_small')})

# Paper Table 2 (D, H) and Table 8 (stochastic depth of the 24-layer models; MaiT-S's is constant).
MAIT_SIZES = {
    'mait_xtiny': dict(embed_dim=144, num_heads=3, drop_path_rate=0.0),
    'mait_tiny': dict(embed_dim=192, num_heads=3, drop_path_rate=0.0),
    'mait_xsmall': dict(embed_dim=288, num_heads=3, drop_path_rate=0.1),
    'mait_small': dict(embed_dim=384, num_heads=6, drop_path_rate=0.1, drop_path_uniform=True),
}


def _cait_layer_scale_init(depth: int) -> float:
    # CaiT's rule for the LayerScale initial value, which shrinks with depth to keep deep stacks stable.
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


def _create_mait(variant: str, pretrained: bool = False, depth: int = 24, layer_scale: bool | None = None,
                 **kwargs) -> MaiT:
    """Paper Table 7 defaults: 24 layers, LayerScale and Sch.2; 12 layers: Sch.1 without LayerScale."""
    if depth not in (12, 24):
        raise ValueError(f'{variant}: depth must be 12 or 24 (the paper\'s MaiT depths), got {depth!r}; '
                         f'build hmait.models.MaiT directly for other depths')
    require_local_weights(variant, pretrained, kwargs)
    if layer_scale is None:
        layer_scale = depth == 24
    kwargs.setdefault('masked_heads', 'sch2' if depth == 24 else 'sch1')
    if layer_scale:
        kwargs.setdefault('layer_scale_init', _cait_layer_scale_init(depth))
    if kwargs.get('features_only'):
        kwargs.setdefault('feature_cls', 'getter')
    args = {**MAIT_SIZES[variant], 'depth': depth, **kwargs}
    return build_model_with_cfg(MaiT, variant, pretrained, **args)


@register_model
def mait_xtiny(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-XT: D=144, H=3 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_xtiny', pretrained, **kwargs)


@register_model
def mait_tiny(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-T: D=192, H=3 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_tiny', pretrained, **kwargs)


@register_model
def mait_xsmall(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-XS: D=288, H=3 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_xsmall', pretrained, **kwargs)


@register_model
def mait_small(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-S: D=384, H=6 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_small', pretrained, **kwargs)
