"""The one attention module and the one transformer block shared by HMaiT and MaiT."""
# No `from __future__ import annotations`: TorchScript reads the annotations of the ignored
# `_masked_heads` as objects.
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp, register_notrace_function
from torch.utils.checkpoint import checkpoint

from ..ops import dense_attention_map, masked_attention_qkv
from ..ops.backends import check_backend
from ..ops.checks import check_grid, check_mask_size, check_masked_heads, check_mode, check_positive_int, is_int
from ..ops.global_attention import (
    autocast_inputs,
    check_global_span,
    global_attention_qkv,
    pool_grid,
    pooled_attention,
    pooled_size,
    span_fits,
)
from ..ops.masked_attention import qkv_heads


# torch.fx records the op as one call: it checks its arguments and picks a backend in Python.
@torch.fx.wrap
@register_notrace_function
@torch.jit.ignore  # TorchScript (deprecated in torch) calls it in Python; torch.compile and torch.export trace it
def _masked_heads(qkv: torch.Tensor, hw: tuple[int, int], mask_size: int, mode: str, alpha: torch.Tensor | None,
                  num_prefix_tokens: int, scale: float, backend: str) -> torch.Tensor:
    """:func:`hmait.ops.masked_attention_qkv` of the masked heads, ``(B, N, 3, m, d)`` -> ``(B, N, m, d)``."""
    return masked_attention_qkv(qkv, hw, mask_size, mode, alpha, num_prefix_tokens, scale, backend)


# One call for torch.fx too: the backend is picked from the sequence length, the span from the grid
# (see hmait.ops.global_attention).
@torch.fx.wrap
@register_notrace_function
@torch.jit.ignore
def _global_heads(qkv: torch.Tensor, hw: tuple[int, int], scale: float, dropout_p: float, span: str,
                  grid: tuple[int, int] | None, backend: str) -> torch.Tensor:
    """:func:`hmait.ops.global_attention.global_attention_qkv` of the global heads,
    ``(B, N, 3, g, d)`` -> ``(B, N, g, d)``."""
    return global_attention_qkv(qkv, hw, scale, dropout_p, span, grid, backend)


def _heads(qkv: torch.Tensor, hw: tuple[int, int], num_heads: int, num_masked_heads: int, mask_size: int, mode: str,
           alpha: torch.Tensor | None, num_prefix_tokens: int, scale: float, dropout_p: float, span: str,
           grid: tuple[int, int] | None, backends: tuple[str, str]) -> torch.Tensor:
    """Every head of a packed ``(B, N, 3, heads, d)`` projection -> ``(B, N, heads, d)``, masked heads first.

    ``backends``: those of the masked and of the global heads (:mod:`hmait.ops.backends`)."""
    m = num_masked_heads
    # One split of the projection into the masked and the global heads (none where a stage has
    # only one kind): its backward is one cat, where slicing q, k and v apart would give six
    # zero-filled full-size gradients to add up.
    if m == num_heads:
        masked, glob = qkv, None
    elif m == 0:
        masked, glob = None, qkv
    else:
        parts = qkv.split([m, num_heads - m], dim=3)
        masked, glob = parts[0], parts[1]
    # Each head group's output goes to the token-major (B, N, heads, d) layout that proj reads.
    # The compiled CPU kernel reads the packed masked heads and writes that layout itself (and, in
    # backward, their packed gradient), so a fully masked stage copies nothing here; a mixed stage
    # pays one copy, in the cat.
    outs = []
    if masked is not None:
        outs.append(_masked_heads(masked, hw, mask_size, mode, alpha, num_prefix_tokens, scale, backends[0]))
    if glob is not None:
        outs.append(_global_heads(glob, hw, scale, dropout_p, span, grid, backends[1]))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


@torch.fx.wrap
@register_notrace_function
@torch.jit.ignore
def _heads_with_pooled_projection(x: torch.Tensor, hw: tuple[int, int], qkv_weight: torch.Tensor,
                                  qkv_bias: torch.Tensor | None, num_heads: int, num_masked_heads: int, mask_size: int,
                                  mode: str, alpha: torch.Tensor | None, scale: float, dropout_p: float,
                                  grid: tuple[int, int] | None, backends: tuple[str, str]) -> torch.Tensor:
    """Every head of a layer with pooled global heads, from its input ``(B, N, dim)`` -> ``(B, N, heads, d)``.

    Beyond the span grid the global heads' keys and values are projected from the pooled tokens:
    average pooling is linear with weights that sum to one, so projecting the pooled tokens is
    projecting the tokens and pooling, and it skips those rows of the qkv GEMM for all but the pooled
    tokens (stage 3 of H-MaiT-T at 800x1344: 196 of 4,200). Within the span grid: the plain projection.
    """
    b, n, c = x.shape
    h, w = check_grid(hw)
    d = c // num_heads
    if span_fits(h, w, grid):
        qkv = F.linear(x, qkv_weight, qkv_bias).reshape(b, n, 3, num_heads, d)
        return _heads(qkv, (h, w), num_heads, num_masked_heads, mask_size, mode, alpha, 0, scale, dropout_p, 'pooled',
                      grid, backends)
    md, gd = num_masked_heads * d, (num_heads - num_masked_heads) * d
    # Under autocast, x is cast once for both projections and the pooling (which would cast it again).
    (x,) = autocast_inputs(x)
    # Rows of the qkv weight: q, k, v, each masked heads first. Computed densely: the global heads'
    # queries, then the masked heads' q, k and v, which thus form one packed (3, m, d) block.
    # From the pooled tokens: the global heads' keys and values.
    parts = [qkv_weight] if qkv_bias is None else [qkv_weight, qkv_bias]
    dense, pooled = [], []
    for t in parts:
        q, k, v = t.split(c)
        dense.append(torch.cat([q[md:], q[:md], k[:md], v[:md]]))
        pooled.append(torch.cat([k[md:], v[md:]]))
    projected = F.linear(x, *dense)                                                     # (B, N, gd + 3 md)
    kv = F.linear(pool_grid(x, (h, w), pooled_size(h, w, grid)), *pooled)             # (B, K, 2 gd)
    out = pooled_attention(projected[..., :gd].reshape(b, n, -1, d), kv.reshape(b, -1, 2, gd // d, d), scale,
                           dropout_p, backends[1])
    if not num_masked_heads:
        return out
    masked = _masked_heads(projected[..., gd:].reshape(b, n, 3, num_masked_heads, d), (h, w), mask_size, mode, alpha,
                           0, scale, backends[0])
    return torch.cat([masked, out], dim=2)


class MaskedMultiheadAttention(nn.Module):
    """Multi-head self-attention whose first ``num_masked_heads`` heads are masked (paper Eq. 2).

    Masked heads see only the ``mask_size x mask_size`` neighbourhood of each grid token in the
    sense of ``mode`` (see :mod:`hmait.ops`); the remaining heads attend globally.
    Input and output are ``(B, N, dim)`` with ``N = num_prefix_tokens + h*w``.

    ``attn_drop`` drops attention probabilities of the global heads only: masked heads never
    materialise their attention map, so there is nothing to drop there.
    ``alpha_init`` is the initial soft-masking factor of each masked head (``mode='soft'``).
    ``global_attn`` is how far the global heads reach (``hmait.ops.global_attention.GLOBAL_SPANS``):
    ``'full'`` (the paper), or ``'pooled'`` / ``'windowed'`` with ``global_grid`` ``(h, w)``, the grid
    beyond which keys are pooled or windows begin (no prefix tokens then).
    ``masked_backend`` and ``global_backend`` (attributes too, settable on a built model) are the backends
    this module's heads ask for (:mod:`hmait.ops.backends`; ``'auto'``: the process's choice).
    ``device`` and ``dtype`` place the parameters, as in timm's layers.
    """

    # TorchScript compiles properties; the forward reads the logits directly.
    __jit_unused_properties__ = ['alpha']

    def __init__(self, dim: int, num_heads: int, num_masked_heads: int = 0, mask_size: int = 3,
                 mode: str = 'hard', qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0., proj_drop: float = 0., num_prefix_tokens: int = 0,
                 alpha_init: float = 0.5, global_attn: str = 'full', global_grid: tuple[int, int] | None = None,
                 masked_backend: str = 'auto', global_backend: str = 'auto',
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
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
        check_global_span(global_attn)
        if global_attn != 'full':
            if (not isinstance(global_grid, (tuple, list)) or len(global_grid) != 2
                    or not all(is_int(s) and s > 0 for s in global_grid)):
                raise ValueError(f'global_attn={global_attn!r} needs global_grid, a pair of positive integers '
                                 f'(h, w), got {global_grid!r}')
            if num_prefix_tokens:
                raise ValueError(f'global_attn={global_attn!r} works on a token grid without prefix tokens, '
                                 f'got num_prefix_tokens={num_prefix_tokens}; use global_attn=\'full\'')
        self.masked_backend = check_backend('masked', masked_backend, 'masked_backend')
        self.global_backend = check_backend('global', global_backend, 'global_backend')
        self.global_attn = global_attn
        self.global_grid = None if global_attn == 'full' else (int(global_grid[0]), int(global_grid[1]))
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

    @torch.jit.ignore
    def _projects_pooled(self) -> bool:
        """Whether the forward may project the pooled global heads' keys and values from pooled tokens:
        pooled global heads next to a plain ``nn.Linear`` qkv, which nothing hooks or replaces (an
        adapter or a hook on qkv then sees every token, as without pooling)."""
        qkv = self.qkv
        return (self.global_attn == 'pooled' and self.num_masked_heads < self.num_heads and type(qkv) is nn.Linear
                and not (qkv._forward_hooks or qkv._forward_pre_hooks))

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x: ``(B, N, dim)``, hw: grid ``(h, w)`` -> ``(B, N, dim)``."""
        b, n, c = x.shape
        alpha = None if self.soft_mask_logit is None else torch.sigmoid(self.soft_mask_logit)
        dropout_p = self.attn_drop if self.training else 0.
        if self._projects_pooled():
            x = _heads_with_pooled_projection(x, hw, self.qkv.weight, self.qkv.bias, self.num_heads,
                                              self.num_masked_heads, self.mask_size, self.mode, alpha, self.scale,
                                              dropout_p, self.global_grid, (self.masked_backend, self.global_backend))
        else:
            x = _heads(self._qkv(x), hw, self.num_heads, self.num_masked_heads, self.mask_size, self.mode, alpha,
                       self.num_prefix_tokens, self.scale, dropout_p, self.global_attn, self.global_grid,
                       (self.masked_backend, self.global_backend))
        return self.proj_drop(self.proj(x.reshape(b, n, c)))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Dense attention maps of every head, ``(B, heads, N, N)``, for analysis on small inputs.

        The global heads' maps are those of full attention: with ``global_attn`` other than ``'full'``
        they are refused on grids larger than ``global_grid``, where the heads compute something else.
        """
        if (self.global_grid is not None and self.num_masked_heads < self.num_heads
                and not span_fits(hw[0], hw[1], self.global_grid)):
            raise ValueError(f'attention_maps: the {self.global_attn} global heads have no dense map on the grid '
                             f'{tuple(hw)}, larger than global_grid {self.global_grid}; analyse at most that grid')
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
    ``global_attn`` and ``global_grid`` set the global heads' span (see :class:`MaskedMultiheadAttention`).
    """

    def __init__(self, dim: int, num_heads: int, num_masked_heads: int = 0, mask_size: int = 3,
                 mask_mode: str = 'hard', mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm,
                 layer_scale_init: float | None = None, num_prefix_tokens: int = 0, with_cp: bool = False,
                 alpha_init: float = 0.5, global_attn: str = 'full', global_grid: tuple[int, int] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.with_cp = with_cp
        self.norm1 = norm_layer(dim, **dd)
        self.attn = MaskedMultiheadAttention(dim, num_heads, num_masked_heads, mask_size, mask_mode, qkv_bias,
                                             qk_scale, attn_drop, drop, num_prefix_tokens, alpha_init,
                                             global_attn, global_grid, **dd)
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
