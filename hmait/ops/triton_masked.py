"""Fused Triton kernels for the hard and strict masked heads, forward and backward.

Only the grid queries go through the kernels: a query at grid position i reads its
``mask_size**2`` neighbours (truncated at the border) and the ``P`` prefix keys, and never
an ``(N, N)`` tensor. Hard mode adds the non-neighbours in the exact linear form of
:func:`hmait.ops.masked_attention`: each has logit 0, so together they contribute
``exp(-m) * count`` to the denominator and ``exp(-m) * (sum of grid v - sum of neighbour v)``
to the numerator. The per-head sum of the grid values is one reduction done in PyTorch.

Prefix queries attend to everything and stay in PyTorch (``scaled_dot_product_attention``).
In backward, the prefix keys' gradients are a reduction over all grid queries, also done in
PyTorch from the saved log-sum-exp; the kernels cover everything that scales with ``N * R^2``.

Accumulation is in float32 whatever the input dtype. The ops are registered as
``torch.library`` custom ops, so ``torch.compile`` treats them as opaque calls (no graph break).

The module imports triton at import time; :func:`hmait.ops.masked_attention` imports it only
when it is about to use it. On a machine without a GPU the kernels run under triton's
interpreter (``TRITON_INTERPRET=1`` set before this module is imported) on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Query (or key) positions per program. 64 rows of d <= 64 keep the per-program tiles in registers.
_BLOCK_M = 64
# Head sizes up to this fit the per-program tiles; masked_attention's 'auto' sends larger heads to PyTorch.
MAX_HEAD_DIM = 256


# Only triton's builtins and tl.reduce are used inside the kernels (not tl.sum / tl.zeros, which
# triton's standard library jit-compiles when triton is imported): the kernels then also run under
# the interpreter when triton was imported before TRITON_INTERPRET was set, e.g. by torch.compile
# earlier in the same process. Reducing with the standard library's own sum combiner is what
# tl.sum does, and lets the interpreter use numpy's sum instead of an element-wise loop.
@triton.jit
def _add(a, b):
    return a + b


_sum_combine = getattr(tl.standard, '_sum_combine', _add)


@triton.jit
def _masked_fwd_kernel(Q, K, V, VSUM, OUT, LSE,
                       sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                       num_heads, h, w, num_prefix, scale, head_dim, value_dim,
                       R: tl.constexpr, HARD: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    hd = (pid_bh % num_heads).to(tl.int64)
    hw = h * w
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < hw
    row = offs_m // w
    col = offs_m % w
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < value_dim

    q_base = Q + b * sq_b + hd * sq_h
    k_base = K + b * sk_b + hd * sk_h
    v_base = V + b * sv_b + hd * sv_h
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * sq_n + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.).to(tl.float32) * scale

    # A finite start for the running maximum keeps exp(m_old - m_new) away from inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0., dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0., dtype=tl.float32)
    neighbour_v = tl.full([BLOCK_M, BLOCK_DV], 0., dtype=tl.float32)
    count = tl.full([BLOCK_M], 0, dtype=tl.int32)

    # Prefix keys: every grid query attends to them.
    for p in range(num_prefix):
        k = tl.load(k_base + p * sk_n + offs_d, mask=d_ok, other=0.).to(tl.float32)
        v = tl.load(v_base + p * sv_n + offs_dv, mask=dv_ok, other=0.).to(tl.float32)
        s = tl.reduce(q * k[None, :], 1, _sum_combine)
        m_new = tl.maximum(m_i, s)
        rescale = tl.exp(m_i - m_new)
        weight = tl.exp(s - m_new)
        l_i = l_i * rescale + weight
        acc = acc * rescale[:, None] + weight[:, None] * v[None, :]
        m_i = m_new

    # Grid neighbours: the R x R box, truncated at the border.
    for di in tl.static_range(R):
        for dj in tl.static_range(R):
            n_row = row + (di - R // 2)
            n_col = col + (dj - R // 2)
            ok = row_ok & (n_row >= 0) & (n_row < h) & (n_col >= 0) & (n_col < w)
            key = (num_prefix + n_row * w + n_col).to(tl.int64)
            k = tl.load(k_base + key[:, None] * sk_n + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.).to(tl.float32)
            v = tl.load(v_base + key[:, None] * sv_n + offs_dv[None, :],
                        mask=ok[:, None] & dv_ok[None, :], other=0.).to(tl.float32)
            s = tl.where(ok, tl.reduce(q * k, 1, _sum_combine), float('-inf'))
            m_new = tl.maximum(m_i, s)
            rescale = tl.exp(m_i - m_new)
            weight = tl.exp(s - m_new)
            l_i = l_i * rescale + weight
            acc = acc * rescale[:, None] + weight[:, None] * v
            m_i = m_new
            if HARD:
                neighbour_v += v
                count += ok.to(tl.int32)

    if HARD:
        # Non-neighbours have logit 0: include 0 in the stabiliser only where some exist.
        outside = (hw - count).to(tl.float32)
        has_outside = outside > 0
        m_fin = tl.where(has_outside, tl.maximum(m_i, 0.), m_i)
        rescale = tl.exp(m_i - m_fin)
        outside_weight = tl.where(has_outside, tl.exp(-m_fin), 0.)
        v_sum = tl.load(VSUM + pid_bh.to(tl.int64) * value_dim + offs_dv, mask=dv_ok, other=0.)
        acc = acc * rescale[:, None] + outside_weight[:, None] * (v_sum[None, :] - neighbour_v)
        l_i = l_i * rescale + outside_weight * outside
        m_i = m_fin

    # Rows past the grid end have nothing to sum; give them a harmless denominator.
    l_i = tl.where(row_ok, l_i, 1.)
    out = acc / l_i[:, None]
    o_rows = pid_bh.to(tl.int64) * hw + offs_m
    tl.store(OUT + o_rows[:, None] * value_dim + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(LSE + o_rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _masked_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                          sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                          num_heads, h, w, num_prefix, scale, head_dim, value_dim,
                          R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr):
    """dq of the grid queries: sum over neighbours and prefix keys of ds_ij * k_j * scale."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    hd = (pid_bh % num_heads).to(tl.int64)
    hw = h * w
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < hw
    row = offs_m // w
    col = offs_m % w
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < value_dim

    k_base = K + b * sk_b + hd * sk_h
    v_base = V + b * sv_b + hd * sv_h
    q = tl.load(Q + b * sq_b + hd * sq_h + offs_m[:, None].to(tl.int64) * sq_n + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.).to(tl.float32) * scale
    rows = pid_bh.to(tl.int64) * hw + offs_m
    do = tl.load(DO + rows[:, None] * value_dim + offs_dv[None, :],
                 mask=row_ok[:, None] & dv_ok[None, :], other=0.).to(tl.float32)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.)
    dq = tl.full([BLOCK_M, BLOCK_D], 0., dtype=tl.float32)

    for p in range(num_prefix):
        k = tl.load(k_base + p * sk_n + offs_d, mask=d_ok, other=0.).to(tl.float32)
        v = tl.load(v_base + p * sv_n + offs_dv, mask=dv_ok, other=0.).to(tl.float32)
        prob = tl.where(row_ok, tl.exp(tl.reduce(q * k[None, :], 1, _sum_combine) - lse), 0.)
        ds = prob * (tl.reduce(do * v[None, :], 1, _sum_combine) - delta)
        dq += ds[:, None] * k[None, :]

    for di in tl.static_range(R):
        for dj in tl.static_range(R):
            n_row = row + (di - R // 2)
            n_col = col + (dj - R // 2)
            ok = row_ok & (n_row >= 0) & (n_row < h) & (n_col >= 0) & (n_col < w)
            key = (num_prefix + n_row * w + n_col).to(tl.int64)
            k = tl.load(k_base + key[:, None] * sk_n + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.).to(tl.float32)
            v = tl.load(v_base + key[:, None] * sv_n + offs_dv[None, :],
                        mask=ok[:, None] & dv_ok[None, :], other=0.).to(tl.float32)
            prob = tl.where(ok, tl.exp(tl.reduce(q * k, 1, _sum_combine) - lse), 0.)
            ds = prob * (tl.reduce(do * v, 1, _sum_combine) - delta)
            dq += ds[:, None] * k

    tl.store(DQ + rows[:, None] * head_dim + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _masked_bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                           sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                           num_heads, h, w, num_prefix, scale, head_dim, value_dim,
                           R: tl.constexpr, HARD: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk, dv of the grid keys from the grid queries that see them.

    The truncated box is symmetric (j is a neighbour of i exactly when i is one of j), so the
    queries that read key j are the R x R box around j. In hard mode v_j also enters through
    the outside sum of those queries with weight -exp(-lse_i); the +exp(-lse_i) that every grid
    value receives through the total sum is added in PyTorch.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    hd = (pid_bh % num_heads).to(tl.int64)
    hw = h * w
    offs_n = pid_n * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = offs_n < hw
    row = offs_n // w
    col = offs_n % w
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < value_dim

    q_base = Q + b * sq_b + hd * sq_h
    keys = (num_prefix + offs_n)[:, None].to(tl.int64)
    k = tl.load(K + b * sk_b + hd * sk_h + keys * sk_n + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.).to(tl.float32)
    v = tl.load(V + b * sv_b + hd * sv_h + keys * sv_n + offs_dv[None, :],
                mask=col_ok[:, None] & dv_ok[None, :], other=0.).to(tl.float32)
    dk = tl.full([BLOCK_M, BLOCK_D], 0., dtype=tl.float32)
    dv = tl.full([BLOCK_M, BLOCK_DV], 0., dtype=tl.float32)

    for di in tl.static_range(R):
        for dj in tl.static_range(R):
            q_row = row + (di - R // 2)
            q_col = col + (dj - R // 2)
            ok = col_ok & (q_row >= 0) & (q_row < h) & (q_col >= 0) & (q_col < w)
            query = q_row * w + q_col
            q = tl.load(q_base + query[:, None].to(tl.int64) * sq_n + offs_d[None, :],
                        mask=ok[:, None] & d_ok[None, :], other=0.).to(tl.float32) * scale
            rows = pid_bh.to(tl.int64) * hw + query
            do = tl.load(DO + rows[:, None] * value_dim + offs_dv[None, :],
                         mask=ok[:, None] & dv_ok[None, :], other=0.).to(tl.float32)
            lse = tl.load(LSE + rows, mask=ok, other=0.)
            delta = tl.load(DELTA + rows, mask=ok, other=0.)
            prob = tl.where(ok, tl.exp(tl.reduce(q * k, 1, _sum_combine) - lse), 0.)
            ds = prob * (tl.reduce(do * v, 1, _sum_combine) - delta)
            dk += ds[:, None] * q
            if HARD:
                # Number of grid neighbours of query i, from its truncated box.
                r0 = tl.maximum(q_row - R // 2, 0)
                r1 = tl.minimum(q_row + R // 2, h - 1)
                c0 = tl.maximum(q_col - R // 2, 0)
                c1 = tl.minimum(q_col + R // 2, w - 1)
                outside = hw - (r1 - r0 + 1) * (c1 - c0 + 1)
                outside_prob = tl.where(ok & (outside > 0), tl.exp(-lse), 0.)
                dv += (prob - outside_prob)[:, None] * do
            else:
                dv += prob[:, None] * do

    out_rows = pid_bh.to(tl.int64) * hw + offs_n
    tl.store(DK + out_rows[:, None] * head_dim + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])
    tl.store(DV + out_rows[:, None] * value_dim + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=col_ok[:, None] & dv_ok[None, :])


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take strides for batch, head and token, and assume unit stride along channels.
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_args(q, k, v, h, w, num_prefix):
    b, heads, _, d = q.shape
    return ((q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
             v.stride(0), v.stride(1), v.stride(2), heads, h, w, num_prefix),
            (triton.cdiv(h * w, _BLOCK_M), b * heads), d, v.shape[-1])


def _outside_count(h: int, w: int, mask_size: int, device: torch.device) -> torch.Tensor:
    """Non-neighbour grid tokens of every grid query, ``(h*w,)`` int."""
    r = mask_size // 2
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    span_r = (rows + r).clamp(max=h - 1) - (rows - r).clamp(min=0) + 1
    span_c = (cols + r).clamp(max=w - 1) - (cols - r).clamp(min=0) + 1
    return (h * w - span_r[:, None] * span_c[None, :]).reshape(-1)


@torch.library.custom_op('hmait::masked_grid_attention_fwd', mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, num_prefix: int,
            mask_size: int, hard: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, heads, _, _ = q.shape
    out = torch.empty(b, heads, h * w, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, heads, h * w, dtype=torch.float32, device=q.device)
    # The outside sum of hard mode runs over grid tokens only (prefix tokens are always neighbours).
    v_sum = v[:, :, num_prefix:].sum(dim=2, dtype=torch.float32).contiguous()
    args, grid, d, dv = _launch_args(q, k, v, h, w, num_prefix)
    _masked_fwd_kernel[grid](q, k, v, v_sum, out, lse, *args, scale, d, dv, R=mask_size, HARD=hard,
                             BLOCK_M=_BLOCK_M, BLOCK_D=triton.next_power_of_2(d),
                             BLOCK_DV=triton.next_power_of_2(dv))
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, h, w, num_prefix, mask_size, hard, scale):
    b, heads, _, _ = q.shape
    return (q.new_empty(b, heads, h * w, v.shape[-1]),
            q.new_empty(b, heads, h * w, dtype=torch.float32))


@torch.library.custom_op('hmait::masked_grid_attention_bwd', mutates_args=())
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, h: int, w: int, num_prefix: int, mask_size: int, hard: bool,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    grad_out = grad_out.contiguous()
    b, heads, _, d = q.shape
    p = num_prefix
    # delta_i = do_i . o_i = sum_j p_ij (do_i . v_j), the softmax-backward correction.
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()
    dq = torch.empty(b, heads, h * w, d, dtype=q.dtype, device=q.device)
    dk_grid = torch.empty(b, heads, h * w, d, dtype=torch.float32, device=q.device)
    dv_grid = torch.empty(b, heads, h * w, v.shape[-1], dtype=torch.float32, device=q.device)
    args, grid, d, dv = _launch_args(q, k, v, h, w, p)
    blocks = dict(BLOCK_M=_BLOCK_M, BLOCK_D=triton.next_power_of_2(d), BLOCK_DV=triton.next_power_of_2(dv))
    _masked_bwd_dq_kernel[grid](q, k, v, grad_out, lse, delta, dq, *args, scale, d, dv, R=mask_size, **blocks)
    _masked_bwd_dkv_kernel[grid](q, k, v, grad_out, lse, delta, dk_grid, dv_grid, *args, scale, d, dv,
                                 R=mask_size, HARD=hard, **blocks)

    if hard:
        # Every grid value is in the total sum of every query that has non-neighbours.
        outside_prob = torch.exp(-lse) * (_outside_count(h, w, mask_size, q.device) > 0)
        dv_grid += (outside_prob[..., None] * grad_out.float()).sum(dim=2, keepdim=True)
    if p:
        # Prefix keys are seen by every grid query: an O(N * P * d) reduction, done densely here.
        q_grid = q.float()
        k_prefix, v_prefix = k[:, :, :p].float(), v[:, :, :p].float()
        prob = torch.exp((q_grid @ k_prefix.transpose(-2, -1)) * scale - lse[..., None])   # (B, heads, hw, P)
        ds = prob * (grad_out.float() @ v_prefix.transpose(-2, -1) - delta[..., None])
        dk_prefix = (ds.transpose(-2, -1) @ q_grid) * scale
        dv_prefix = prob.transpose(-2, -1) @ grad_out.float()
        dk_grid = torch.cat([dk_prefix, dk_grid], dim=2)
        dv_grid = torch.cat([dv_prefix, dv_grid], dim=2)
    return dq, dk_grid.to(k.dtype), dv_grid.to(v.dtype)


@_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, h, w, num_prefix, mask_size, hard, scale):
    b, heads, _, d = q.shape
    return q.new_empty(b, heads, h * w, d), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, h, w, num_prefix, mask_size, hard, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.config = (h, w, num_prefix, mask_size, hard, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(grad_out, q, k, v, out, lse, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_grid_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, num_prefix: int,
                          mask_size: int, mode: str, scale: float) -> torch.Tensor:
    """Hard or strict masked attention of the grid queries through the fused kernels.

    Args:
        q: grid queries ``(B, heads, h*w, d)``; k: ``(B, heads, P + h*w, d)``;
            v: ``(B, heads, P + h*w, d_v)``, the prefix tokens first.
        mode: 'hard' or 'strict'. scale: the logit scale.

    Returns:
        ``(B, heads, h*w, d_v)`` in the dtype of ``q``; differentiable in q, k and v.
    """
    if mode not in ('hard', 'strict'):
        raise ValueError(f"the triton kernels implement mode 'hard' and 'strict', got {mode!r}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f'the triton kernels support head sizes up to {MAX_HEAD_DIM}, got q {tuple(q.shape)} '
                         f"and v {tuple(v.shape)}; use backend='torch'")
    out, _ = _fwd_op(q, k, v, h, w, num_prefix, mask_size, mode == 'hard', float(scale))
    return out
