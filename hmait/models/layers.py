"""The one attention module and the one transformer block shared by HMaiT and MaiT."""
# No `from __future__ import annotations`: TorchScript reads the annotations of the ignored
# `_masked_heads` as objects.
import math

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp, register_notrace_function
from torch.utils.checkpoint import checkpoint

from ..ops import dense_attention_map, global_attention, masked_attention_qkv
from ..ops.checks import check_mask_size, check_masked_heads, check_mode, check_positive_int
from ..ops.masked_attention import qkv_heads


# torch.fx records the op as one call: it checks its arguments and picks a backend in Python.
@torch.fx.wrap
@register_notrace_function
@torch.jit.ignore  # TorchScript (deprecated in torch) calls it in Python; torch.compile and torch.export trace it
def _masked_heads(qkv: torch.Tensor, hw: tuple[int, int], mask_size: int, mode: str, alpha: torch.Tensor | None,
                  num_prefix_tokens: int, scale: float) -> torch.Tensor:
    """:func:`hmait.ops.masked_attention_qkv` of the masked heads, ``(B, N, 3, m, d)`` -> ``(B, N, m, d)``."""
    return masked_attention_qkv(qkv, hw, mask_size, mode, alpha, num_prefix_tokens, scale)


# One call for torch.fx too: the backend is picked from the sequence length (see hmait.ops.global_attention).
@torch.fx.wrap
@register_notrace_function
@torch.jit.ignore
def _global_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    """:func:`hmait.ops.global_attention` of the global heads, ``(B, g, N, d)`` -> ``(B, g, N, d)``."""
    return global_attention(q, k, v, scale, dropout_p)


class MaskedMultiheadAttention(nn.Module):
    """Multi-head self-attention whose first ``num_masked_heads`` heads are masked (paper Eq. 2).

    Masked heads see only the ``mask_size x mask_size`` neighbourhood of each grid token in the
    sense of ``mode`` (see :mod:`hmait.ops`); the remaining heads attend globally.
    Input and output are ``(B, N, dim)`` with ``N = num_prefix_tokens + h*w``.

    ``attn_drop`` drops attention probabilities of the global heads only: masked heads never
    materialise their attention map, so there is nothing to drop there.
    ``alpha_init`` is the initial soft-masking factor of each masked head (``mode='soft'``).
    ``device`` and ``dtype`` place the parameters, as in timm's layers.
    """

    # TorchScript compiles properties; the forward reads the logits directly.
    __jit_unused_properties__ = ['alpha']

    def __init__(self, dim: int, num_heads: int, num_masked_heads: int = 0, mask_size: int = 3,
                 mode: str = 'hard', qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0., proj_drop: float = 0., num_prefix_tokens: int = 0,
                 alpha_init: float = 0.5, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        check_positive_int('dim', dim)
        check_positive_int('num_heads', num_heads)
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        check_masked_heads(num_masked_heads, num_heads)
        check_mode(mode)
        check_mask_size(mask_size)
        if not 0. < alpha_init < 1.:
            raise ValueError(f'alpha_init must lie in (0, 1), got {alpha_init!r}')
        self.num_heads = num_heads
        self.num_masked_heads = num_masked_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.mask_size = mask_size
        self.mode = mode
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if mode == 'soft' and num_masked_heads:
            # alpha = sigmoid(logit) keeps every soft-masking factor inside (0, 1).
            logit = math.log(alpha_init / (1. - alpha_init))
            self.soft_mask_logit = nn.Parameter(torch.full((num_masked_heads,), logit, **dd))
        else:
            self.register_parameter('soft_mask_logit', None)

    @property
    def alpha(self) -> torch.Tensor | None:
        """Soft-masking factors of the masked heads, ``(num_masked_heads,)``, or None."""
        return None if self.soft_mask_logit is None else torch.sigmoid(self.soft_mask_logit)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, N, dim)`` -> the qkv projection as ``(B, N, 3, heads, d)``."""
        b, n, _ = x.shape
        return self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: ``(B, N, dim)``, hw: grid ``(h, w)`` -> ``(B, N, dim)``."""
        b, n, c = x.shape
        qkv = self._qkv(x)
        m = self.num_masked_heads
        # One split of the projection into the masked and the global heads (none where a stage has
        # only one kind): its backward is one cat, where slicing q, k and v apart would give six
        # zero-filled full-size gradients to add up.
        if m == self.num_heads:
            masked, glob = qkv, None
        elif m == 0:
            masked, glob = None, qkv
        else:
            parts = qkv.split([m, self.num_heads - m], dim=3)
            masked, glob = parts[0], parts[1]
        # Each head group's output goes to the token-major (B, N, heads, d) layout that proj reads.
        # The compiled CPU kernel reads the packed masked heads and writes that layout itself (and, in
        # backward, their packed gradient), so a fully masked stage copies nothing here; a mixed stage
        # pays one copy, in the cat.
        outs = []
        if masked is not None:
            alpha = None if self.soft_mask_logit is None else torch.sigmoid(self.soft_mask_logit)
            outs.append(_masked_heads(masked, hw, self.mask_size, self.mode, alpha, self.num_prefix_tokens,
                                      self.scale))
        if glob is not None:
            q, k, v = qkv_heads(glob)
            outs.append(_global_heads(q, k, v, self.scale, self.attn_drop if self.training else 0.).transpose(1, 2))
        x = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
        x = x.reshape(b, n, c)
        return self.proj_drop(self.proj(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Dense attention maps of every head, ``(B, heads, N, N)``, for analysis on small inputs."""
        q, k, _ = qkv_heads(self._qkv(x))
        m = self.num_masked_heads
        maps = []
        if m:
            maps.append(dense_attention_map(q[:, :m], k[:, :m], hw, self.mask_size, self.mode, self.alpha,
                                            self.num_prefix_tokens, self.scale))
        if m < self.num_heads:
            maps.append(dense_attention_map(q[:, m:], k[:, m:], hw, self.mask_size, None, None,
                                            self.num_prefix_tokens, self.scale))
        return torch.cat(maps, dim=1)


class MaskedAttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Input and output are ``(B, N, dim)``; ``hw`` gives the token grid behind the
    ``num_prefix_tokens`` prefix tokens. ``layer_scale_init`` enables LayerScale.
    """

    def __init__(self, dim: int, num_heads: int, num_masked_heads: int = 0, mask_size: int = 3,
                 mask_mode: str = 'hard', mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm,
                 layer_scale_init: float | None = None, num_prefix_tokens: int = 0, with_cp: bool = False,
                 alpha_init: float = 0.5, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.with_cp = with_cp
        self.norm1 = norm_layer(dim, **dd)
        self.attn = MaskedMultiheadAttention(dim, num_heads, num_masked_heads, mask_size, mask_mode, qkv_bias,
                                             qk_scale, attn_drop, drop, num_prefix_tokens, alpha_init, **dd)
        self.ls1 = LayerScale(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale_init, **dd) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), hw)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(self._forward, x, hw, use_reentrant=False)
        return self._forward(x, hw)
