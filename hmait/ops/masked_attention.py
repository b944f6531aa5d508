"""Functional masked attention (MaiT paper, Eq. 2) on a 2-D token grid.

Tokens are ``num_prefix_tokens`` prefix tokens (class / distillation tokens) followed by an
``h x w`` grid in row-major order. The mask of a grid token is the ``mask_size x mask_size``
box centred on it, self included, truncated at the border. Prefix tokens attend to every token
and every token attends to them.

Modes (how a non-neighbour logit ``s = q.k / sqrt(d)`` enters the softmax):

* ``'hard'``   -> ``0``        (the paper's Hard Masking: ``M * s`` with binary ``M``)
* ``'soft'``   -> ``alpha * s`` (the paper's Soft Masking, one ``alpha`` in (0, 1) per head)
* ``'strict'`` -> ``-inf``     (classic neighbourhood attention)

``dense_masked_attention`` is the O(N^2) reference and the oracle for every fast path;
``masked_attention`` picks a fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Re-exported from hmait.ops.backends: where the masked heads' backends and export forms are now chosen.
from .backends import EXPORT_FORMS, MASKED_BACKENDS, choose_masked, export_form, export_masked_heads  # noqa: F401
from .checks import check_grid, check_int, check_mask_size, check_mode, check_packed_qkv, exporting

# Soft mode works on query chunks so that no (N, N) tensor is ever alive; this bounds the
# number of float32 logits per chunk (about 64 MiB).
_SOFT_CHUNK_ELEMENTS = 1 << 24


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw, mask_size: int, mode: str,
              alpha: torch.Tensor | None, num_prefix_tokens: int) -> tuple[int, int]:
    check_mode(mode)
    check_mask_size(mask_size)
    h, w = check_grid(hw)
    check_int('num_prefix_tokens', num_prefix_tokens, minimum=0)
    for name, t in (('q', q), ('k', k), ('v', v)):
        if t.dim() != 4:
            raise ValueError(f'{name} must have shape (B, heads, N, d), got shape {tuple(t.shape)}')
    if q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(f'q, k, v must share (B, heads, N) and q, k the head size; got q {tuple(q.shape)}, '
                         f'k {tuple(k.shape)}, v {tuple(v.shape)}')
    n = q.shape[2]
    if n != num_prefix_tokens + h * w:
        raise ValueError(f'the token count N={n} must equal num_prefix_tokens + h*w = '
                         f'{num_prefix_tokens} + {h}*{w} = {num_prefix_tokens + h * w}')
    if mode == 'soft':
        if alpha is None:
            raise ValueError("mode='soft' needs alpha, a tensor of shape (heads,) with values in (0, 1)")
        if alpha.shape != (q.shape[1],):
            raise ValueError(f'alpha must have shape (heads,) = ({q.shape[1]},), got {tuple(alpha.shape)}')
    return h, w


def _mask_rows(h: int, w: int, mask_size: int, num_prefix_tokens: int, start: int, stop: int,
               device: torch.device | None = None) -> torch.Tensor:
    """Rows ``start:stop`` of the neighbourhood mask, bool ``(stop - start, N)``."""
    p, r = num_prefix_tokens, mask_size // 2
    grid = torch.arange(h * w, device=device)
    rows, cols = grid // w, grid % w
    query = torch.arange(start, stop, device=device)
    qi = (query - p).clamp(min=0)
    near = (((rows[qi][:, None] - rows[None]).abs() <= r)
            & ((cols[qi][:, None] - cols[None]).abs() <= r))
    mask = torch.ones(stop - start, p + h * w, dtype=torch.bool, device=device)
    mask[:, p:] = near
    mask[query < p] = True
    return mask


def neighbourhood_mask(h: int, w: int, mask_size: int = 3, num_prefix_tokens: int = 0,
                       device: torch.device | None = None) -> torch.Tensor:
    """The binary mask M of Eq. 2 as bool ``(N, N)`` with ``N = num_prefix_tokens + h*w``."""
    check_mask_size(mask_size)
    h, w = check_grid((h, w))
    n = num_prefix_tokens + h * w
    return _mask_rows(h, w, mask_size, num_prefix_tokens, 0, n, device)


def _mask_logits(logits: torch.Tensor, mask: torch.Tensor, mode: str, alpha: torch.Tensor | None) -> torch.Tensor:
    """Apply a mode to logits ``(B, heads, n, N)`` given the bool mask ``(n, N)``."""
    if mode == 'hard':
        return logits.masked_fill(~mask, 0.0)
    if mode == 'strict':
        return logits.masked_fill(~mask, float('-inf'))
    scale = alpha.to(logits.dtype)[:, None, None]
    return torch.where(mask, logits, logits * scale)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision inputs accumulate in float32 so that logits of magnitude 1e4 stay finite.
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _in_compute_dtype(q, k, v, scale):
    """q, k, v in the compute dtype, and the logit scale (``1/sqrt(d)`` unless given)."""
    dtype = _compute_dtype(q)
    return q.to(dtype), k.to(dtype), v.to(dtype), (q.shape[-1] ** -0.5 if scale is None else scale)


def dense_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw, mask_size: int = 3,
                           mode: str = 'hard', alpha: torch.Tensor | None = None,
                           num_prefix_tokens: int = 0, scale: float | None = None) -> torch.Tensor:
    """Reference masked attention with the full ``(N, N)`` attention map.

    Args:
        q, k: ``(B, heads, N, d)``; v: ``(B, heads, N, d_v)``.
        hw: ``(h, w)`` of the token grid; ``N = num_prefix_tokens + h*w``.
        alpha: ``(heads,)`` in (0, 1), soft mode only.
        scale: logit scale, ``1/sqrt(d)`` by default.

    Returns:
        ``(B, heads, N, d_v)`` in the dtype of ``q``.
    """
    h, w = _validate(q, k, v, hw, mask_size, mode, alpha, num_prefix_tokens)
    return _dense(q, k, v, h, w, mask_size, mode, alpha, num_prefix_tokens, scale)


def dense_attention_map(q: torch.Tensor, k: torch.Tensor, hw, mask_size: int = 3, mode: str | None = 'hard',
                        alpha: torch.Tensor | None = None, num_prefix_tokens: int = 0,
                        scale: float | None = None) -> torch.Tensor:
    """The attention map ``A = softmax(masked logits)``, ``(B, heads, N, N)``; ``mode=None`` is unmasked."""
    h, w = _validate(q, k, k, hw, mask_size, mode or 'hard', alpha, num_prefix_tokens)
    return _attention_rows(q, k, h, w, mask_size, mode, alpha, num_prefix_tokens, scale)


def _attention_rows(q, k, h, w, mask_size, mode, alpha, num_prefix_tokens, scale, start=0):
    """Attention-map rows ``start:start + q.shape[2]`` (``q`` holds just those rows), in the compute
    dtype; ``mode=None`` leaves the logits unmasked."""
    dtype = _compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    if mode is not None:
        mask = _mask_rows(h, w, mask_size, num_prefix_tokens, start, start + q.shape[2], q.device)
        logits = _mask_logits(logits, mask, mode, alpha)
    return logits.softmax(dim=-1)


def _dense(q, k, v, h, w, mask_size, mode, alpha, num_prefix_tokens, scale, start=0):
    """Rows ``start:start + q.shape[2]`` of the masked attention output (``q`` holds just those rows)."""
    attn = _attention_rows(q, k, h, w, mask_size, mode, alpha, num_prefix_tokens, scale, start)
    return (attn @ v.to(attn.dtype)).to(q.dtype)


def _soft_chunked(q, k, v, h, w, mask_size, alpha, num_prefix_tokens, scale):
    """Exact soft masking in query chunks; each chunk is recomputed in backward (no (N, N) tensor kept)."""
    b, heads, n, _ = q.shape
    chunk = max(1, min(n, _SOFT_CHUNK_ELEMENTS // max(1, b * heads * n)))
    if chunk >= n:
        return _dense(q, k, v, h, w, mask_size, 'soft', alpha, num_prefix_tokens, scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, alpha))
    outs = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        args = (q[:, :, start:stop], k, v, h, w, mask_size, 'soft', alpha, num_prefix_tokens, scale, start)
        outs.append(checkpoint(_dense, *args, use_reentrant=False) if needs_grad else _dense(*args))
    return torch.cat(outs, dim=2)


def _valid_with_prefix(valid: torch.Tensor, p: int) -> torch.Tensor:
    """(R^2, h, w) offset validity -> (h, w, R^2 + p), prefix keys always valid."""
    valid = valid.permute(1, 2, 0)
    return torch.cat([valid, valid.new_ones(*valid.shape[:2], p)], dim=-1) if p else valid


def _local_grid_attention(q, k, v, h, w, mask_size, mode, num_prefix_tokens, scale):
    """Hard or strict masked attention in O(N * mask_size^2 * d), without any (N, N) tensor.

    Keys and values are zero-padded once; each of the mask_size^2 neighbour offsets is a shifted
    view, so the neighbour logits are row-wise dot products. Hard mode uses the exact linear form
    of Eq. 2: every non-neighbour has logit 0, so together they add ``c = exp(-m)`` times their
    count to the denominator and ``c`` times their value sum to the numerator. That sum is the
    total value sum minus the neighbours', so the numerator is
    ``sum_j (w_j - c) v_j + c * sum_all v`` over the neighbours j alone (padding has v = 0).
    """
    out_dtype = q.dtype
    q, k, v, scale = _in_compute_dtype(q, k, v, scale)
    dtype = q.dtype
    b, heads, n, d = q.shape
    p, r = num_prefix_tokens, mask_size // 2

    q_grid = q[:, :, p:].reshape(b, heads, h, w, d) * scale
    k_pad = F.pad(k[:, :, p:].reshape(b, heads, h, w, d), (0, 0, r, r, r, r))
    v_pad = F.pad(v[:, :, p:].reshape(b, heads, h, w, v.shape[-1]), (0, 0, r, r, r, r))
    # Which of the mask_size^2 offsets fall inside the image, per grid position: (R^2, h, w).
    ones = F.pad(torch.ones(h, w, dtype=torch.bool, device=q.device), (r, r, r, r))
    offsets = [(di, dj) for di in range(mask_size) for dj in range(mask_size)]
    valid = torch.stack([ones[di:di + h, dj:dj + w] for di, dj in offsets])

    # Neighbour logits (B, heads, h, w, R^2 + P): grid neighbours, then the prefix tokens.
    # vecdot fuses the product and the reduction: no (B, heads, h, w, d) temporary per offset.
    logits = [torch.linalg.vecdot(q_grid, k_pad[:, :, di:di + h, dj:dj + w]) for di, dj in offsets]
    logits = torch.stack(logits, dim=-1)
    if p:
        prefix_logits = q_grid.reshape(b, heads, h * w, d) @ k[:, :, :p].transpose(-2, -1)
        logits = torch.cat([logits, prefix_logits.reshape(b, heads, h, w, p)], dim=-1)
    # Padding offsets become -inf.
    logits = logits.masked_fill(~_valid_with_prefix(valid, p), float('-inf'))

    num_neighbours = valid.sum(0) + p                            # (h, w)
    num_outside = (p + h * w) - num_neighbours                    # (h, w)
    m = logits.amax(dim=-1, keepdim=True)
    if mode == 'hard':
        # Non-neighbours have logit 0; include it in the stabiliser only where they exist.
        m = torch.maximum(m, torch.where(num_outside > 0, 0.0, float('-inf')).to(dtype)[..., None])
    m = m.detach()  # The stabiliser cancels out of the softmax; no gradient needs to flow through it.
    weights = torch.exp(logits - m)                               # (B, heads, h, w, R^2 + P)
    denom = weights.sum(-1, keepdim=True)
    if mode == 'hard':
        # Where every token is a neighbour there is no outside mass (and exp(-m) may overflow).
        outside_weight = torch.exp(-m).masked_fill((num_outside == 0)[..., None], 0.0)  # (B, heads, h, w, 1)
        denom = denom + outside_weight * num_outside.to(dtype)[..., None]
        weights = weights - outside_weight

    # In-place accumulation of the shifted value views: one output-sized buffer for all offsets.
    (di, dj), rest = offsets[0], offsets[1:]
    numer = weights[..., 0, None] * v_pad[:, :, di:di + h, dj:dj + w]
    for i, (di, dj) in enumerate(rest, start=1):
        numer.addcmul_(weights[..., i, None], v_pad[:, :, di:di + h, dj:dj + w])
    if p:
        prefix_numer = weights[..., len(offsets):].reshape(b, heads, h * w, p) @ v[:, :, :p]
        numer = numer + prefix_numer.reshape_as(numer)
    if mode == 'hard':
        numer = numer + outside_weight * v.sum(dim=2)[:, :, None, None]
    grid_out = (numer / denom).reshape(b, heads, h * w, -1)

    if p:
        # Prefix queries attend to every token: plain attention over p rows.
        prefix_out = F.scaled_dot_product_attention(q[:, :, :p], k, v, scale=scale)
        grid_out = torch.cat([prefix_out, grid_out], dim=2)
    return grid_out.to(out_dtype)


# Query tile side of the halo path: Swin's window, so the tiles fit H-MaiT's 56/28/14 grids exactly.
HALO_TILE = 7


def _halo_indices(h, w, mask_size: int, num_prefix_tokens: int, tile: int, device: torch.device | None):
    """Where the halo path reads and writes, for ``T`` tiles of ``tile x tile`` queries.

    Returns:
        query_index ``(T, tile^2)``: the token each tile query reads (clamped into the grid; queries
            beyond it are padding and are never written back);
        key_index ``(T, S)``: each tile's halo of ``(tile + 2r)^2`` grid keys (clamped likewise), then
            the prefix tokens, ``S = (tile + 2r)^2 + num_prefix_tokens``;
        allowed ``(T, tile^2, S)``: which keys are in a query's mask (its neighbours inside the grid,
            and every prefix token);
        out_index ``(h * w,)``: the flat tile position of every grid token, row-major.
    All are computed from ``h`` and ``w``, so they stay symbolic in an export with dynamic shapes.
    """
    p, r = num_prefix_tokens, mask_size // 2
    side = tile + 2 * r
    tiles_h, tiles_w = (h + tile - 1) // tile, (w + tile - 1) // tile
    local, halo = torch.arange(tile, device=device), torch.arange(side, device=device)
    q_rows = (torch.arange(tiles_h, device=device) * tile)[:, None] + local            # (tiles_h, tile)
    q_cols = (torch.arange(tiles_w, device=device) * tile)[:, None] + local            # (tiles_w, tile)
    k_rows = (torch.arange(tiles_h, device=device) * tile - r)[:, None] + halo         # (tiles_h, side)
    k_cols = (torch.arange(tiles_w, device=device) * tile - r)[:, None] + halo         # (tiles_w, side)

    def flat(rows, cols, n):  # (tiles_h, n), (tiles_w, n) -> token indices (T, n * n), clamped
        index = rows.clamp(0, h - 1)[:, None, :, None] * w + cols.clamp(0, w - 1)[None, :, None, :]
        return (index + p).reshape(tiles_h * tiles_w, n * n)

    query_index, key_index = flat(q_rows, q_cols, tile), flat(k_rows, k_cols, side)
    inside = (((k_rows >= 0) & (k_rows < h))[:, None, :, None]
              & ((k_cols >= 0) & (k_cols < w))[None, :, None, :]).reshape(tiles_h * tiles_w, side * side)
    # Query (a, c) of a tile sits at (a + r, c + r) of its halo: its neighbours are the halo positions
    # within r of that, the same (tile^2, side^2) pattern in every tile.
    near = (halo[None] - local[:, None] - r).abs() <= r                                 # (tile, side)
    near = (near[:, None, :, None] & near[None, :, None, :]).reshape(tile * tile, side * side)
    allowed = near[None] & inside[:, None]                                              # (T, tile^2, side^2)
    if p:
        prefix = torch.arange(p, device=device)
        key_index = torch.cat([key_index, prefix.expand(key_index.shape[0], p)], dim=1)
        allowed = torch.cat([allowed, allowed.new_ones(*allowed.shape[:2], p)], dim=-1)
    # Rows and columns as broadcast aranges: a remainder by a symbolic size does not export.
    rows, cols = torch.arange(h, device=device)[:, None], torch.arange(w, device=device)[None]
    out_index = ((rows // tile) * tiles_w + cols // tile) * (tile * tile) + (rows % tile) * tile + cols % tile
    return query_index, key_index, allowed, out_index.reshape(h * w)


# What the halo path adds to masked-out logits: far enough below any logit a model computes that
# their weight is exactly 0 in every float type, yet finite, since OpenVINO's bf16 softmax slowed
# by half on -3e38 and ONNX Runtime's tenfold on -inf.
_HALO_MASK_BIAS = -1e9


def _halo_attention(q, k, v, h, w, mask_size, mode, num_prefix_tokens, scale, tile: int | None = None):
    """Hard or strict masked attention as batched matrix products over tiles with a halo (for export).

    The grid is cut into ``tile x tile`` query tiles; the keys a tile's queries can reach lie in its
    ``(tile + 2r)^2`` halo, gathered once per tile. Then, as in Swin's windows: one MatMul for the
    logits, a constant additive mask (:data:`_HALO_MASK_BIAS` where a halo key is not a query's
    neighbour), one softmax and one MatMul for the outputs. Hard mode is exact with one more key per
    tile: the ``n_out`` non-neighbours of a query all have logit 0, so together they weigh as one key
    of logit ``log(n_out)``, whose softmax weight ``p`` is ``n_out`` times the weight ``p0`` of each.
    Its value is the total value sum, and ``p`` times a constant row is subtracted from the weights
    before the output MatMul: ``p0`` from each neighbour's, ``p - p0`` from its own. That leaves
    ``p0`` times the sum over the non-neighbours. Few, large, standard operators instead of one slice
    per offset, which is what ONNX runtimes execute well; every size symbolic, so one export runs at
    any grid. Memory is O(N * (tile + 2r)^2).
    """
    tile = HALO_TILE if tile is None else tile
    out_dtype = q.dtype
    q, k, v, scale = _in_compute_dtype(q, k, v, scale)
    dtype = q.dtype
    b, heads, n, d = q.shape
    p, r = num_prefix_tokens, mask_size // 2
    query_index, key_index, allowed, out_index = _halo_indices(h, w, mask_size, p, tile, q.device)
    num_tiles = query_index.shape[0]
    bias = (~allowed).to(dtype) * _HALO_MASK_BIAS                                       # (T, tile^2, S)
    values = v
    if mode == 'hard':
        # Non-neighbours per token (any value for the prefix rows, which are not grid queries).
        rows, cols = torch.arange(h, device=q.device)[:, None], torch.arange(w, device=q.device)[None]
        near_rows = (rows + r).clamp(max=h - 1) - (rows - r).clamp(min=0) + 1
        near_cols = (cols + r).clamp(max=w - 1) - (cols - r).clamp(min=0) + 1
        num_outside = F.pad((h * w - near_rows * near_cols).reshape(h * w).to(dtype), (p, 0), value=1.)  # (N,)
        outside = num_outside[query_index]                                             # (T, tile^2)
        counted = outside.clamp(min=1.)
        # The extra key (a zero key, so its logit is its bias): log(n_out), or masked out where a
        # query has no non-neighbours (a grid inside one mask).
        extra = torch.where(outside > 0, counted.log(), torch.full_like(outside, _HALO_MASK_BIAS))
        bias = torch.cat([bias, extra[..., None]], dim=-1)
        share = 1. / counted[..., None]                                                # p0 / p
        correction = torch.cat([allowed.to(dtype) * share, 1. - share], dim=-1)        # (T, tile^2, S + 1)
        k = torch.cat([k, k.new_zeros(b, heads, 1, d)], dim=2)
        values = torch.cat([v, v.sum(dim=2, keepdim=True)], dim=2)
        key_index = torch.cat([key_index, key_index.new_full((num_tiles, 1), n)], dim=1)

    def gather(t, index):  # (B, heads, N, c) -> (B, heads, T, len, c)
        return t.index_select(2, index.reshape(-1)).reshape(b, heads, num_tiles, index.shape[1], t.shape[-1])

    q_tiles = gather(q, query_index)                                                    # (B, heads, T, tile^2, d)
    k_halo, v_halo = gather(k, key_index), gather(values, key_index)                   # (B, heads, T, S, .)
    attn = (torch.matmul(q_tiles, k_halo.transpose(-2, -1)) * scale + bias).softmax(dim=-1)
    if mode == 'hard':
        attn = attn - attn[..., -1:] * correction
    out = attn @ v_halo                                                                 # (B, heads, T, tile^2, dv)
    out = out.reshape(b, heads, num_tiles * tile * tile, -1).index_select(2, out_index)  # (B, heads, h*w, dv)
    if p:
        # Prefix queries attend to every token: plain attention over p rows.
        prefix_out = F.scaled_dot_product_attention(q[:, :, :p], k[:, :, :n], v, scale=scale)
        out = torch.cat([prefix_out, out], dim=2)
    return out.to(out_dtype)


def _openvino_node(qkv: torch.Tensor, h, w, mask_size: int, mode: str, num_prefix_tokens: int,
                   scale: float | None) -> torch.Tensor:
    """The ONNX node ``hmait.MaskedAttention`` of a packed ``(B, N, 3, heads, d)`` qkv -> ``(B, N, heads, d)``.

    Only an exporter can trace it; the grid goes in as a tensor, so ``h`` and ``w`` stay symbolic in a
    dynamic export. Its attributes are those the OpenVINO operation reads (masked_attention_openvino.cpp).
    """
    b, n, _, heads, d = qkv.shape
    scale = d ** -0.5 if scale is None else scale
    dtype = qkv.dtype
    if export_form() == 'openvino-bf16':
        qkv = qkv.to(torch.bfloat16)
    grid = torch.tensor([h, w], dtype=torch.int64)
    attributes = dict(mask_size=mask_size, mode=mode, num_prefix_tokens=num_prefix_tokens, scale=float(scale))
    out = torch.onnx.ops.symbolic('hmait::MaskedAttention', (qkv, grid), attributes, dtype=qkv.dtype,
                                  shape=(b, n, heads, d), version=1)
    return out.to(dtype)


def _triton_local_attention(q, k, v, h, w, mask_size, mode, num_prefix_tokens, scale):
    """Hard or strict masked attention with the grid queries in the fused Triton kernels."""
    from .triton_masked import triton_grid_attention  # imported lazily: triton is optional

    p = num_prefix_tokens
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grid_out = triton_grid_attention(q[:, :, p:], k, v, h, w, p, mask_size, mode, scale)
    if p:
        # Prefix queries attend to every token: plain attention over p rows.
        prefix_out = F.scaled_dot_product_attention(q[:, :, :p], k, v, scale=scale)
        grid_out = torch.cat([prefix_out.to(grid_out.dtype), grid_out], dim=2)
    return grid_out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw, mask_size: int = 3,
                     mode: str = 'hard', alpha: torch.Tensor | None = None, num_prefix_tokens: int = 0,
                     scale: float | None = None, backend: str = 'auto') -> torch.Tensor:
    """Masked attention (paper Eq. 2) without materialising the ``(N, N)`` attention map.

    Same arguments and result as :func:`dense_masked_attention`:
    q, k ``(B, heads, N, d)``, v ``(B, heads, N, d_v)`` -> ``(B, heads, N, d_v)``.

    Hard and strict modes cost O(N * mask_size^2 * d) time and memory; soft mode is inherently
    global (every logit is kept, scaled by alpha) and runs in bounded-memory query chunks.

    ``backend`` (hard and strict modes; soft mode always runs the PyTorch path):

    * 'auto': the compiled kernels where they can run: Triton on CUDA when triton is installed,
      the C++ kernel (:mod:`hmait.ops.cpu_kernel`) on CPU when it is built, with one warning per
      process when it is not. ONNX and ``torch.export`` exports take 'halo' (or the form set by
      :func:`export_masked_heads`), and under
      ``torch.compile`` the CPU kernel is used only if it was loaded before tracing.
      :mod:`hmait.ops.backends` makes the choice, says why (its debug log) and holds the settings
      that replace 'auto' process-wide (``set_backend('masked', ...)``, ``HMAIT_MASKED_ATTENTION_BACKEND``).
    * 'torch': the portable PyTorch path, the reference of every kernel.
    * 'halo': tiles with a halo of keys, batched MatMuls in standard operators (what exports hold).
    * 'triton': the fused Triton kernels (CPU tensors only under ``TRITON_INTERPRET=1``).
    * 'cpu': the compiled CPU kernel; an error says why when it is unavailable.
    * 'openvino': only while exporting: one ``hmait.MaskedAttention`` node, which OpenVINO runs with the
      project's extension (:mod:`hmait.ops.openvino_extension`).
    """
    h, w = _validate(q, k, v, hw, mask_size, mode, alpha, num_prefix_tokens)
    chosen = choose_masked(q, v.shape[-1], mode, backend).backend
    return _run(chosen, q, k, v, h, w, mask_size, mode, alpha, num_prefix_tokens, scale)


def _run(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, mask_size: int,
         mode: str, alpha: torch.Tensor | None, num_prefix_tokens: int, scale: float | None) -> torch.Tensor:
    """:func:`masked_attention` on validated arguments through the chosen backend."""
    if backend == 'triton':
        return _triton_local_attention(q, k, v, h, w, mask_size, mode, num_prefix_tokens, scale)
    if backend == 'halo':
        return _halo_attention(q, k, v, h, w, mask_size, mode, num_prefix_tokens, scale)
    if backend == 'cpu':
        from .cpu_kernel import masked_attention_cpu
        return masked_attention_cpu(q, k, v, (h, w), mask_size, mode, num_prefix_tokens, scale)
    if backend == 'openvino':
        qkv = torch.stack([q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)], dim=2)
        return _openvino_node(qkv, h, w, mask_size, mode, num_prefix_tokens, scale).transpose(1, 2)
    if mode == 'soft':
        return _soft_chunked(q, k, v, h, w, mask_size, alpha, num_prefix_tokens, scale)
    return _local_grid_attention(q, k, v, h, w, mask_size, mode, num_prefix_tokens, scale)


def qkv_heads(qkv: torch.Tensor) -> list[torch.Tensor]:
    """A packed ``(B, N, 3, heads, d)`` projection -> q, k, v as ``(B, heads, N, d)`` views."""
    if not torch.jit.is_scripting() and exporting():
        # In an exported graph: one transpose of qkv and a split into whole blocks, where the views
        # below become three strided slices and three transposes (a head slice of qkv is copied first).
        b, n, _, heads, d = qkv.shape
        blocks = qkv.reshape(b, n, 3 * heads, d).transpose(1, 2).split(heads, dim=1)
        return [blocks[0], blocks[1], blocks[2]]
    # Indexed rather than iterated, so that torch.fx can trace it.
    parts = qkv.unbind(2)
    return [parts[0].transpose(1, 2), parts[1].transpose(1, 2), parts[2].transpose(1, 2)]


def masked_attention_qkv(qkv: torch.Tensor, hw, mask_size: int = 3, mode: str = 'hard',
                         alpha: torch.Tensor | None = None, num_prefix_tokens: int = 0, scale: float | None = None,
                         backend: str = 'auto') -> torch.Tensor:
    """:func:`masked_attention` on a packed qkv projection, in the token-major layout.

    qkv ``(B, N, 3, heads, d)`` (e.g. ``qkv_linear(x).reshape(B, N, 3, heads, d)`` or a slice of its
    heads) -> ``(B, N, heads, d)``, so that ``out.reshape(B, N, heads * d)`` is the input of the
    output projection. Arguments and backends are those of :func:`masked_attention`. The compiled CPU
    kernel takes qkv as it is and writes its gradient in one piece; the other backends run on q, k, v
    views of it.
    """
    q, k, v = qkv_heads(check_packed_qkv(qkv))
    h, w = _validate(q, k, v, hw, mask_size, mode, alpha, num_prefix_tokens)
    chosen = choose_masked(q, v.shape[-1], mode, backend).backend
    if chosen == 'cpu':
        from .cpu_kernel import masked_attention_qkv_cpu
        return masked_attention_qkv_cpu(qkv, (h, w), mask_size, mode, num_prefix_tokens, scale)
    if chosen == 'openvino':
        return _openvino_node(qkv, h, w, mask_size, mode, num_prefix_tokens, scale)
    return _run(chosen, q, k, v, h, w, mask_size, mode, alpha, num_prefix_tokens, scale).transpose(1, 2)
