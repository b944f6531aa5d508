"""H-MaiT: Swin's hierarchy with masked heads over the whole stage instead of shifted windows.

Parameter names follow timm's Swin layout (``patch_embed``, ``layers.{i}.downsample``,
``layers.{i}.blocks.{j}.{norm1,attn,norm2,mlp}``), so Swin checkpoints map onto H-MaiT with
only their window-specific tensors dropped (see :mod:`hmait.models.checkpoint`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from timm.layers import PatchEmbed, resample_abs_pos_embed_nhwc, trunc_normal_
from timm.models.swin_transformer import PatchMerging

from ..ops.checks import (
    check_image,
    check_int,
    check_mask_size,
    check_masked_heads,
    check_mode,
    check_positive_int,
    is_int,
)
from ..ops.global_attention import check_global_span
from .checkpoint import load_pretrained
from .layers import MaskedAttentionBlock

# torch.fx records the input check as one call: it compares traced shapes.
torch.fx.wrap('check_image')

# Architectures: Swin's dims, depths and heads; masked heads per stage from the paper (section 5.4).
ARCH_SETTINGS = {
    'tiny': dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), masked_heads=(3, 6, 4, 0)),
    'small': dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), masked_heads=(3, 6, 4, 0)),
    # Not from the paper: Swin-B's heads with the tiny/small masking proportions
    # (every head in stages 1-2, a third in stage 3, none in stage 4).
    'base': dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), masked_heads=(4, 8, 5, 0)),
}

_ACTIVATIONS = {'GELU': nn.GELU, 'ReLU': nn.ReLU, 'SiLU': nn.SiLU}
_NORMS = {'LN': nn.LayerNorm}


def _layer_from_cfg(cfg: dict, table: dict, arg: str) -> type[nn.Module]:
    # mmcv's builders would pull mmcv into the core package, which must import without it;
    # transformers only need these few layer types.
    kind = cfg.get('type') if isinstance(cfg, dict) else None
    if kind not in table:
        raise ValueError(f'{arg} type must be one of {sorted(table)}, got {cfg!r}')
    return table[kind]


class HMaiTStage(nn.Module):
    """Optional 2x patch merging, then ``depth`` masked-attention blocks. NHWC in and out."""

    def __init__(self, in_dims: int, dims: int, depth: int, downsample: bool, block_kwargs: list[dict],
                 norm_layer: type[nn.Module], device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = PatchMerging(in_dims, dims, norm_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(MaskedAttentionBlock(dims, **kw, **dd) for kw in block_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, H, W, C_in)`` -> ``(B, H', W', C)``."""
        x = self.downsample(x)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        for block in self.blocks:
            x = block(x, (h, w))
        return x.reshape(b, h, w, c)


def _per_stage(name: str, value, num_stages: int) -> tuple:
    if is_int(value) or isinstance(value, float):
        return (value,) * num_stages
    if not isinstance(value, Sequence) or len(value) != num_stages:
        raise ValueError(f'{name} must have one entry per stage ({num_stages}, the length of depths), got {value!r}')
    return tuple(value)


class HMaiT(BaseModule):
    """H-MaiT backbone with mmdet's ``SwinTransformer`` interface (``window_size`` replaced by masking).

    Args:
        arch: 'tiny', 'small' or 'base' presets for embed_dims, depths, num_heads and masked_heads;
            explicit arguments override the preset.
        masked_heads: masked heads per stage; in every block of stage i the first masked_heads[i] heads
            are masked and the rest attend globally. Paper: (3, 6, 4, 0).
        mask_size: side of the square mask (odd). mask_mode: 'hard', 'soft' or 'strict'.
        strides: patch-embedding stride, then 2 for every patch merging (the only supported layout).
        out_indices: stages whose outputs are returned, each through its own LayerNorm ``norm{i}``.
        frozen_stages: -1 freezes nothing; k >= 0 freezes the patch embedding, then stages 0..k-1
            (with the patch merging that follows each) and their output norms.
        convert_weights: accept Swin checkpoints (Microsoft, mmdet or timm layout) in init_cfg.
        global_attn: how far the global heads reach. 'full' (the paper): the whole stage, a cost that
            grows with the square of the pixels. 'pooled': keys and values average-pooled to the grid the
            stage has at ``pretrain_img_size`` (14x14 and 7x7 in stages 3 and 4 for 224 px), so every
            query still sees the whole image, coarser. 'windowed': windows of that grid, padded at the
            bottom and right. Both are linear in the pixels and add no parameters; up to the
            pre-training grid all three compute the same.
        full_global_blocks: blocks (numbered over all stages from 0, as stochastic depth counts them)
            whose global heads stay 'full' whatever ``global_attn`` says, to propagate across the
            image as ViTDet's global blocks do.
        device, dtype: where and in which dtype to create the parameters (timm's factory arguments).
        Others as in mmdet's SwinTransformer.

    Forward: ``(B, in_channels, H, W)`` of any size -> tuple of ``(B, C_i, H_i, W_i)`` maps.
    """

    # TorchScript compiles properties; mmengine's initialisation flag is not used in the forward.
    __jit_unused_properties__ = ['is_init']

    def __init__(self, arch: str = 'tiny', pretrain_img_size: int | Sequence[int] = 224, in_channels: int = 3,
                 embed_dims: int | None = None, patch_size: int = 4, mlp_ratio: float = 4.,
                 depths: Sequence[int] | None = None, num_heads: Sequence[int] | None = None,
                 masked_heads: Sequence[int] | None = None, mask_size: int = 3, mask_mode: str = 'hard',
                 strides: Sequence[int] = (4, 2, 2, 2), out_indices: Sequence[int] = (0, 1, 2, 3),
                 qkv_bias: bool = True, qk_scale: float | None = None, patch_norm: bool = True,
                 drop_rate: float = 0., attn_drop_rate: float = 0., drop_path_rate: float = 0.1,
                 use_abs_pos_embed: bool = False, act_cfg: dict | None = None,
                 norm_cfg: dict | None = None, with_cp: bool = False, convert_weights: bool = False,
                 frozen_stages: int = -1, pretrained: str | None = None, init_cfg: dict | None = None,
                 global_attn: str = 'full', full_global_blocks: Sequence[int] = (),
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give either pretrained or init_cfg, not both')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)
        if arch not in ARCH_SETTINGS:
            raise ValueError(f'arch must be one of {sorted(ARCH_SETTINGS)}, got {arch!r}')
        preset = ARCH_SETTINGS[arch]
        embed_dims = preset['embed_dims'] if embed_dims is None else embed_dims
        depths = tuple(preset['depths'] if depths is None else depths)
        num_stages = len(depths)
        if num_stages == 0 or any(not is_int(d) or d <= 0 for d in depths):
            raise ValueError(f'depths must be a non-empty list of positive integers, got {depths!r}')
        num_heads = _per_stage('num_heads', preset['num_heads'] if num_heads is None else num_heads, num_stages)
        masked_heads = _per_stage('masked_heads', preset['masked_heads'] if masked_heads is None else masked_heads,
                                  num_stages)
        strides = _per_stage('strides', strides, num_stages)
        if strides[0] != patch_size or any(s != 2 for s in strides[1:]):
            raise ValueError(f'strides must be (patch_size, 2, 2, ...) = {(patch_size,) + (2,) * (num_stages - 1)}, '
                             f'got {strides!r}: patch merging always halves the grid')
        check_positive_int('embed_dims', embed_dims)
        dims = [embed_dims * 2 ** i for i in range(num_stages)]
        for i, (dim, heads, masked) in enumerate(zip(dims, num_heads, masked_heads)):
            if not is_int(heads) or heads <= 0 or dim % heads:
                raise ValueError(f'embed_dims {embed_dims} gives {dim} channels in stage {i}, which num_heads[{i}]='
                                 f'{heads!r} must divide')
            check_masked_heads(masked, heads, name=f'masked_heads[{i}]', heads_name=f'num_heads[{i}]')
        check_mask_size(mask_size)
        check_mode(mask_mode, name='mask_mode')
        out_indices = tuple(out_indices)
        if not out_indices or any(not is_int(i) or not 0 <= i < num_stages for i in out_indices):
            raise ValueError(f'out_indices must be stage indices in [0, {num_stages - 1}], got {out_indices!r}')
        check_int('frozen_stages', frozen_stages, minimum=-1, maximum=num_stages)
        check_global_span(global_attn)
        num_blocks = sum(depths)
        full_global_blocks = tuple(full_global_blocks)
        if any(not is_int(i) or not 0 <= i < num_blocks for i in full_global_blocks):
            raise ValueError(f'full_global_blocks must be block indices in [0, {num_blocks - 1}] (counted over all '
                             f'stages), got {full_global_blocks!r}')
        check_positive_int('in_channels', in_channels)
        dd = dict(device=device, dtype=dtype)

        act_layer = _layer_from_cfg(act_cfg or dict(type='GELU'), _ACTIVATIONS, 'act_cfg')
        norm_layer = _layer_from_cfg(norm_cfg or dict(type='LN'), _NORMS, 'norm_cfg')
        self.in_channels = in_channels
        self.embed_dims = embed_dims
        self.depths = depths
        self.num_heads = num_heads
        self.masked_heads = masked_heads
        self.feature_dims = dims
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.convert_weights = convert_weights
        self.global_attn = global_attn
        self.full_global_blocks = full_global_blocks

        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_channels,
                                      embed_dim=embed_dims, norm_layer=norm_layer if patch_norm else None,
                                      output_fmt='NHWC', strict_img_size=False, dynamic_img_pad=True, **dd)
        size = (pretrain_img_size,) * 2 if isinstance(pretrain_img_size, int) else tuple(pretrain_img_size)
        self.pos_grid = (size[0] // patch_size, size[1] // patch_size)
        if use_abs_pos_embed:
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dims, **dd))
        else:
            self.absolute_pos_embed = None
        self.drop_after_pos = nn.Dropout(drop_rate)

        # Stochastic depth grows linearly over all blocks; plain Python, so that a meta-device build works.
        rates = [drop_path_rate * i / (num_blocks - 1) if num_blocks > 1 else 0. for i in range(num_blocks)]
        self.layers = nn.ModuleList()
        # The grid of each stage at the pre-training size (patch merging pads odd grids): the span of
        # the pooled and windowed global heads.
        self.global_grids = [(-(-self.pos_grid[0] // 2 ** i), -(-self.pos_grid[1] // 2 ** i))
                             for i in range(num_stages)]
        for i in range(num_stages):
            first = sum(depths[:i])
            block_kwargs = [dict(num_heads=num_heads[i], num_masked_heads=masked_heads[i], mask_size=mask_size,
                                 mask_mode=mask_mode, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                                 drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[first + j],
                                 act_layer=act_layer, norm_layer=norm_layer, with_cp=with_cp,
                                 global_attn='full' if first + j in full_global_blocks else global_attn,
                                 global_grid=self.global_grids[i])
                            for j in range(depths[i])]
            self.layers.append(HMaiTStage(dims[i - 1] if i else dims[0], dims[i], depths[i], i > 0, block_kwargs,
                                          norm_layer, **dd))
        for i in out_indices:
            self.add_module(f'norm{i}', norm_layer(dims[i], **dd))
        # The output norms by stage index, for code that TorchScript can compile (it cannot look up
        # `norm{i}` by a computed name). It aliases the `norm{i}` modules, which keep their names in
        # checkpoints and parameter lists (mmdet's names): the hooks keep the alias out of state dicts,
        # and named_children() leaves it out.
        self.stage_norms = nn.ModuleList(getattr(self, f'norm{i}', None) or nn.Identity() for i in range(num_stages))
        self.register_state_dict_post_hook(_drop_stage_norm_keys)
        self.register_load_state_dict_pre_hook(_add_stage_norm_keys)
        self.register_load_state_dict_post_hook(_forget_missing_stage_norm_keys)
        self._init_fresh()
        self._freeze_stages()

    def named_children(self):
        """Children without the ``stage_norms`` alias, so that traversals child by child (mmengine's
        optimiser constructor, ``.to()``, ``.train()``) meet each ``norm{i}`` once."""
        for name, module in super().named_children():
            if name != 'stage_norms':
                yield name, module

    def _init_fresh(self) -> None:
        """Swin's initialisation: truncated-normal linears and position embedding, unit LayerNorms."""
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained', checkpoint=PATH)``; other init_cfgs go to mmengine.

        Without init_cfg the weights were already initialised at construction (as timm models are).
        """
        if self.init_cfg is None:
            return
        if self.init_cfg.get('type') == 'Pretrained':
            load_pretrained(self, self.init_cfg['checkpoint'], convert_swin=self.convert_weights,
                            prefix=self.init_cfg.get('prefix'), logger=MMLogger.get_current_instance())
            self._is_init = True
            return
        super().init_weights()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block's activations in the backward pass (timm's name for ``with_cp``)."""
        for stage in self.layers:
            for block in stage.blocks:
                block.with_cp = enable

    def train(self, mode: bool = True) -> HMaiT:
        super().train(mode)
        self.stage_norms.train(mode)  # not among named_children(); it also holds the stages' Identity placeholders
        self._freeze_stages()
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules = [self.patch_embed, self.drop_after_pos]
        for i in range(self.frozen_stages):
            modules.append(self.layers[i])
            if i in self.out_indices:
                modules.append(getattr(self, f'norm{i}'))
        # mmdet counts the patch merging after a stage as part of it; here it opens the next stage.
        if 0 < self.frozen_stages < len(self.layers):
            modules.append(self.layers[self.frozen_stages].downsample)
        return modules

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0 and self.absolute_pos_embed is not None:
            self.absolute_pos_embed.requires_grad = False
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, H, W)`` -> NHWC tokens ``(B, ceil(H/p), ceil(W/p), C)``."""
        check_image(x, self.in_channels, 'in_channels')
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            pos = self.absolute_pos_embed.reshape(1, self.pos_grid[0], self.pos_grid[1], -1)
            # timm's resampling: traced as one call by torch.fx, and a no-op at the pretraining size.
            x = x + resample_abs_pos_embed_nhwc(pos, [x.shape[1], x.shape[2]], antialias=False)
        return self.drop_after_pos(x)

    def _stage_outputs(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Run the stages up to max(indices); NCHW maps of ``indices``, through norm{i} where it exists."""
        x = self._embed(x)
        outs = []
        last = max(indices)
        for i, (stage, norm) in enumerate(zip(self.layers[:last + 1], self.stage_norms[:last + 1])):
            x = stage(x)
            if i in indices:
                outs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self._stage_outputs(x, self.out_indices))


def _drop_stage_norm_keys(module: HMaiT, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + 'stage_norms.')]:
        del state_dict[key]


def _add_stage_norm_keys(module: HMaiT, state_dict: dict, prefix: str, *args) -> None:
    # The alias loads what `norm{i}` loads (the same tensors), so that strict loading sees no missing keys.
    for i in range(len(module.stage_norms)):
        source = f'{prefix}norm{i}.'
        for key in [k for k in state_dict if k.startswith(source)]:
            state_dict[f'{prefix}stage_norms.{i}.{key[len(source):]}'] = state_dict[key]


def _forget_missing_stage_norm_keys(module: HMaiT, incompatible_keys) -> None:
    # A missing `norm{i}` key is reported under its own name; its alias is not a second missing key.
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith('stage_norms.') or '.stage_norms.' in k)]
