"""The global (unmasked) heads: ``softmax(q k^T * scale) v`` by torch's SDPA, by two matmuls, or by the
project's C++ kernel.

On CPU, torch's ``scaled_dot_product_attention`` runs a flash kernel. For the short sequences of
H-MaiT's stages 3 and 4 (196 and 49 tokens at 224 px) it is slower than the plain formulation,
two batched matmuls and a softmax, most of all in the bf16 backward: measured with
``tools/analysis/benchmark_attention.py --paths sdpa-global global-matmul`` (see
docs/benchmarks.md). For long sequences flash is the faster one and keeps no ``(N, N)`` map, so
``backend='auto'`` takes the matmuls only up to a token count and a logits count per dtype
(larger when gradients are taken), on CPU, in eager mode: :mod:`hmait.ops.backends` holds those
limits, makes the choice and says why.
On CPU in eager mode, ``'auto'`` takes the C++ kernel of :mod:`hmait.ops.cpu_kernel` (``backend='cpu'``)
where it is built and the call has no bias or dropout: one pass per block of queries (float32 logits,
softmax and weighted values, the bfloat16 dot product where the CPU has it) and a backward that
recomputes the probabilities. Measured (docs/benchmarks.md): faster than both in evaluation at every
shape; in training level with the matmuls in bf16 and faster than both in fp32, keeping no logits map.
Under ``torch.compile``, ``torch.export``, ONNX export and tracing it always takes SDPA, so that
the traced graph does not depend on the sequence length. Every path is tested against the
unmasked dense reference (``dense_attention_map(..., mode=None) @ v``), gradients included where it
has them.

:func:`global_attention_qkv` also limits how far the heads reach (``GLOBAL_SPANS``, H-MaiT's
``global_attn``): over keys and values pooled to a span grid, or within windows of it, so that their
cost grows linearly with the image beyond the pre-training size.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .backends import GLOBAL_BACKENDS, choose_global  # noqa: F401 (GLOBAL_BACKENDS re-exported)
from .checks import check_grid
from .masked_attention import qkv_heads


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as autocast would hand them to SDPA: floating point (float64 aside) in the autocast
    dtype when autocast is on for their device, unchanged otherwise."""
    device = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     dropout_p: float = 0., backend: str = 'auto', bias: torch.Tensor | None = None) -> torch.Tensor:
    """Unmasked attention of ``(B, heads, N, d)`` q, k, v -> ``(B, heads, N, d_v)``, in their dtype.

    ``dropout_p`` drops attention probabilities (pass 0 in evaluation, as with SDPA).
    ``backend``: ``'auto'`` (:func:`hmait.ops.backends.choose_global` picks), ``'sdpa'``, ``'matmul'``, or
    ``'cpu'``: the compiled C++ kernel (CPU, no bias or dropout, head sizes 32 and 64).
    ``bias``: an optional float tensor added to the scaled logits, broadcastable to ``(B, heads, N, N_k)``
    (SDPA's float ``attn_mask``).
    Under autocast both backends compute in the autocast dtype, as SDPA does there.
    """
    q, k, v = autocast_inputs(q, k, v)
    backend = choose_global(q, k, v, backend, bias=bias is not None, dropout_p=dropout_p).backend
    if backend == 'cpu':
        from .cpu_kernel import global_attention_cpu
        return global_attention_cpu(q, k, v, scale)
    if backend == 'sdpa':
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Autocast off: the dtypes below are chosen, not cast. Half-precision inputs get float32 logits
    # (bf16 rounds a logit near 1e3 to a multiple of 4) and a float32 softmax; the probabilities go
    # back to the input dtype for the matmul with v, as in flash attention. Scaling q (N x d) is
    # cheaper than scaling the N x N logits. q and k are usually strided views of a packed projection:
    # they are copied once, contiguous, in the logits' dtype (a cast that kept their strides would make
    # the matmul copy them again).
    device = q.device.type
    no_autocast = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
                   else contextlib.nullcontext())
    with no_autocast:
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        if dropout_p == 0. and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return _MatmulAttention.apply(q, k, v, scale, bias, dtype)
        attn = _probabilities(q, k, scale, bias, dtype).to(v.dtype)
        if dropout_p > 0.:
            attn = F.dropout(attn, dropout_p)
        return attn @ v


def _probabilities(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """``softmax(scale * q k^T + bias)`` computed in ``dtype``."""
    q = q.to(dtype, memory_format=torch.contiguous_format, copy=True).mul_(scale)
    k = k.to(dtype, memory_format=torch.contiguous_format, copy=True)
    logits = q @ k.transpose(-2, -1)
    if bias is not None:
        logits += bias.to(dtype)
    if logits.requires_grad or logits.device.type != 'cpu':
        return logits.softmax(dim=-1)
    # Without autograd the softmax overwrites the logits: its CPU kernel reads each row before writing
    # it, and no fresh (B, heads, N, N) buffer is paged in (about as long as the softmax itself).
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)


class _MatmulAttention(torch.autograd.Function):
    """The matmul path when gradients are taken: the forward of :func:`global_attention` (logits and
    softmax in ``dtype``, float32 for half-precision inputs), and a backward in the input dtype, as
    autocast runs every other backward GEMM. Only the probabilities in the input dtype are kept, and the
    softmax's backward reads them in one fused pass (float32 accumulation), where autograd through the
    forward would also keep the float32 probabilities and, for half-precision inputs, cast their gradient
    to float32 and run float32 GEMMs."""

    @staticmethod
    def forward(ctx, q, k, v, scale, bias, dtype):
        attn = _probabilities(q, k, scale, bias, dtype).to(v.dtype)
        ctx.save_for_backward(q, k, v, attn)
        ctx.scale = scale
        return attn @ v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, attn = ctx.saved_tensors
        grad_out = grad_out.to(v.dtype)
        grad_v = attn.transpose(-2, -1) @ grad_out if ctx.needs_input_grad[2] else None
        grad_logits = torch.ops.aten._softmax_backward_data(grad_out @ v.transpose(-2, -1), attn, -1, attn.dtype)
        grad_q = (grad_logits @ k).mul_(ctx.scale) if ctx.needs_input_grad[0] else None
        grad_k = (grad_logits.transpose(-2, -1) @ q).mul_(ctx.scale) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v, None, None, None


# How far the global heads of an H-MaiT stage reach (the global_attn option of HMaiT):
# 'full': every token of the stage (the paper), cost quadratic in the pixels;
# 'pooled': every query sees keys and values average-pooled to at most the span grid (the grid the stage
#     has at the pre-training size), as in the spatial-reduction attention of PVT and Twins' global
#     sub-sampled attention, but without parameters: linear in the pixels;
# 'windowed': queries see only the keys of their span-grid window, windows tiled from the top left and
#     padded at the bottom and right (padded keys are left out), as in ViTDet: linear in the pixels.
# Where the stage's grid fits inside the span grid, all three compute the same: nothing is pooled and
# there is one window.
GLOBAL_SPANS = ('full', 'pooled', 'windowed')

# Added to the logits of a window's padded keys: exp() of it is 0 in every float type (the logits of
# real keys are far smaller in magnitude), without the infinities that slow runtimes' softmax.
_PADDED_KEY_BIAS = -1e4


def span_fits(h, w, grid: tuple[int, int]) -> bool:
    """True when the ``h x w`` grid fits inside the span grid ``grid``, decided only for concrete sizes:
    a traced or exported graph takes the general path, which computes the same there, so one graph
    serves every size."""
    return not isinstance(h, torch.SymInt) and not isinstance(w, torch.SymInt) and h <= grid[0] and w <= grid[1]


def pooled_size(h, w, grid: tuple[int, int]) -> tuple:
    """The grid that pooled keys and values have: ``(min(h, grid_h), min(w, grid_w))``, symbolic in an export."""
    return torch.sym_min(h, grid[0]), torch.sym_min(w, grid[1])


def _average_matrix(n, m, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(m, n)``: row i averages the inputs of adaptive average pooling's bin i of ``n`` -> ``m``
    (``[floor(i n / m), ceil((i + 1) n / m))``, torch's bins). The identity when ``m == n``."""
    rows = torch.arange(m, device=device)
    start = (rows * n) // m
    end = ((rows + 1) * n + m - 1) // m
    cols = torch.arange(n, device=device)
    inside = (cols[None] >= start[:, None]) & (cols[None] < end[:, None])
    return inside.to(dtype) / (end - start)[:, None].to(dtype)


def pool_grid(x: torch.Tensor, hw, out_hw) -> torch.Tensor:
    """Adaptive average pooling of grid tokens ``(B, h * w, C)`` -> ``(B, oh * ow, C)``, as two small
    matrix products (standard operators with every size symbolic, where ONNX has no adaptive pooling)."""
    b, _, c = x.shape
    (h, w), (oh, ow) = hw, out_hw
    x = _average_matrix(h, oh, x.dtype, x.device) @ x.reshape(b, h, w * c)            # (B, oh, w*C)
    x = _average_matrix(w, ow, x.dtype, x.device) @ x.reshape(b, oh, w, c)            # (B, oh, ow, C)
    return x.reshape(b, oh * ow, c)


def _window_grid(x: torch.Tensor, hw, size: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """Grid tokens ``(B, h * w, C)`` -> windows ``(B * nh * nw, sh * sw, C)``, zero-padded at the bottom
    and right, and the window counts ``(nh, nw)``."""
    b, _, c = x.shape
    (h, w), (sh, sw) = hw, size
    nh, nw = (h + sh - 1) // sh, (w + sw - 1) // sw
    x = F.pad(x.reshape(b, h, w, c), (0, 0, 0, nw * sw - w, 0, nh * sh - h))
    x = x.reshape(b, nh, sh, nw, sw, c).transpose(2, 3).reshape(b * nh * nw, sh * sw, c)
    return x, (nh, nw)


def _unwindow_grid(x: torch.Tensor, hw, size: tuple[int, int], counts) -> torch.Tensor:
    """Inverse of :func:`_window_grid`: ``(B * nh * nw, sh * sw, C)`` -> ``(B, h * w, C)``, padding dropped."""
    (h, w), (sh, sw), (nh, nw) = hw, size, counts
    c = x.shape[-1]
    x = x.reshape(-1, nh, nw, sh, sw, c).transpose(2, 3).reshape(-1, nh * sh, nw * sw, c)
    return x[:, :h, :w].reshape(-1, h * w, c)


def _padded_key_bias(hw, size: tuple[int, int], counts, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(nh * nw, 1, 1, sh * sw)``: 0 for the real keys of each window, ``_PADDED_KEY_BIAS`` for padding."""
    (h, w), (sh, sw), (nh, nw) = hw, size, counts
    rows = torch.arange(nh * sh, device=device) < h
    cols = torch.arange(nw * sw, device=device) < w
    real = (rows.reshape(nh, 1, sh, 1) & cols.reshape(1, nw, 1, sw)).reshape(nh * nw, 1, 1, sh * sw)
    return (~real).to(dtype) * _PADDED_KEY_BIAS


def pooled_attention(q: torch.Tensor, kv: torch.Tensor, scale: float | None = None,
                     dropout_p: float = 0., backend: str = 'auto') -> torch.Tensor:
    """Queries ``(B, N, heads, d)`` over pooled keys and values ``(B, K, 2, heads, d)`` -> ``(B, N, heads, d)``."""
    kv = kv.permute(2, 0, 3, 1, 4)
    return global_attention(q.transpose(1, 2), kv[0], kv[1], scale, dropout_p, backend).transpose(1, 2)


def check_global_span(span, name: str = 'global_attn') -> str:
    if span not in GLOBAL_SPANS:
        raise ValueError(f'{name} must be one of {GLOBAL_SPANS}, got {span!r}')
    return span


def global_attention_qkv(qkv: torch.Tensor, hw, scale: float | None = None, dropout_p: float = 0.,
                         span: str = 'full', grid: tuple[int, int] | None = None,
                         backend: str = 'auto') -> torch.Tensor:
    """Global heads of a packed ``(B, h * w, 3, heads, d)`` grid projection -> ``(B, h * w, heads, d)``.

    ``span`` (see ``GLOBAL_SPANS``) with ``grid``, the span grid: ``'full'`` attends over the whole
    grid (:func:`global_attention`); ``'pooled'`` over keys and values average-pooled to
    ``min(h, grid_h) x min(w, grid_w)``; ``'windowed'`` within ``grid``-sized windows. Where the grid
    fits inside the span grid all three are :func:`global_attention` itself. Prefix tokens are not
    supported by the pooled and windowed spans. ``backend`` is :func:`global_attention`'s.
    """
    check_global_span(span, 'span')
    h, w = check_grid(hw)
    if span == 'full' or span_fits(h, w, grid):
        q, k, v = qkv_heads(qkv)
        return global_attention(q, k, v, scale, dropout_p, backend).transpose(1, 2)
    b, n, _, heads, d = qkv.shape
    if span == 'pooled':
        kv = pool_grid(qkv[:, :, 1:].reshape(b, n, 2 * heads * d), (h, w), pooled_size(h, w, grid))
        return pooled_attention(qkv[:, :, 0], kv.reshape(b, -1, 2, heads, d), scale, dropout_p, backend)
    windows, counts = _window_grid(qkv.reshape(b, n, 3 * heads * d), (h, w), grid)
    q, k, v = qkv_heads(windows.reshape(windows.shape[0], -1, 3, heads, d))
    bias = None
    if isinstance(h, torch.SymInt) or isinstance(w, torch.SymInt) or h % grid[0] or w % grid[1]:
        bias = _padded_key_bias((h, w), grid, counts, torch.float32, qkv.device).repeat(b, 1, 1, 1)
    out = global_attention(q, k, v, scale, dropout_p, backend, bias=bias).transpose(1, 2)       # (B*nW, S, heads, d)
    return _unwindow_grid(out.reshape(out.shape[0], -1, heads * d), (h, w), grid, counts).reshape(b, n, heads, d)
