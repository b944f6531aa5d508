"""The fast masked-attention paths against the dense reference of paper Eq. 2."""
import importlib
import itertools

import pytest
import torch

from hmait.ops import MASK_MODES, dense_attention_map, dense_masked_attention, masked_attention, neighbourhood_mask

# (h, w, prefix tokens): square, non-square, a single row, grids smaller than the mask.
GRIDS = [(5, 7, 0), (6, 6, 1), (1, 9, 0), (1, 9, 2), (2, 2, 0), (2, 1, 1), (1, 1, 0)]


def _qkv(b, heads, n, d, dtype=torch.float64, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g, dtype=dtype) * scale for _ in range(3)]


def test_neighbourhood_mask_matches_definition():
    h, w, r, p = 4, 5, 1, 1
    mask = neighbourhood_mask(h, w, 3, num_prefix_tokens=p)
    assert mask.shape == (p + h * w, p + h * w) and mask.dtype == torch.bool
    assert mask[0].all() and mask[:, 0].all()  # the class token sees and is seen by everyone
    for a, b in itertools.product(range(h * w), repeat=2):
        near = abs(a // w - b // w) <= r and abs(a % w - b % w) <= r
        assert bool(mask[p + a, p + b]) == near
    # corner token: 4 grid neighbours (itself included) + the prefix token
    assert int(mask[p].sum()) == 4 + p
    assert int(mask[p + w + 1].sum()) == 9 + p


def test_dense_reference_follows_eq2_by_hand():
    """Hard mode: non-neighbour logits are 0 (not -inf), so each adds e^0 to the softmax."""
    q, k, v = _qkv(1, 1, 3, 2)  # a 1 x 3 grid: tokens 0 and 2 are not neighbours with mask 3
    logits = (q @ k.transpose(-2, -1)) / 2 ** 0.5
    masked = logits.clone()
    masked[..., 0, 2] = 0
    masked[..., 2, 0] = 0
    expected = masked.softmax(-1) @ v
    assert torch.allclose(dense_masked_attention(q, k, v, (1, 3)), expected)
    strict = logits.clone()
    strict[..., 0, 2] = float('-inf')
    strict[..., 2, 0] = float('-inf')
    assert torch.allclose(dense_masked_attention(q, k, v, (1, 3), mode='strict'), strict.softmax(-1) @ v)
    alpha = torch.tensor([0.25], dtype=torch.float64)
    soft = logits.clone()
    soft[..., 0, 2] *= 0.25
    soft[..., 2, 0] *= 0.25
    assert torch.allclose(dense_masked_attention(q, k, v, (1, 3), mode='soft', alpha=alpha), soft.softmax(-1) @ v)


@pytest.mark.parametrize('mode', MASK_MODES)
@pytest.mark.parametrize('h,w,p', GRIDS)
@pytest.mark.parametrize('mask_size', [3, 5])
def test_fast_path_matches_dense_reference(mode, h, w, p, mask_size):
    q, k, v = _qkv(2, 3, p + h * w, 4)
    alpha = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    fast = masked_attention(q, k, v, (h, w), mask_size, mode, alpha, p)
    ref = dense_masked_attention(q, k, v, (h, w), mask_size, mode, alpha, p)
    assert fast.shape == ref.shape == (2, 3, p + h * w, 4)
    assert torch.allclose(fast, ref, atol=1e-12, rtol=0)


def test_soft_chunked_path_matches_dense(monkeypatch):
    """Force several query chunks so the chunked (checkpointed) soft path itself is exercised."""
    ops = importlib.import_module('hmait.ops.masked_attention')  # the package re-exports a function of that name
    monkeypatch.setattr(ops, '_SOFT_CHUNK_ELEMENTS', 2 * 3 * 37 * 5)  # 5 query rows per chunk
    q, k, v = _qkv(2, 3, 1 + 36, 4)
    for t in (q, k, v):
        t.requires_grad_(True)
    alpha = torch.tensor([0.2, 0.4, 0.8], dtype=torch.float64, requires_grad=True)
    fast = masked_attention(q, k, v, (6, 6), 3, 'soft', alpha, 1)
    grads = torch.autograd.grad(fast.square().sum(), (q, k, v, alpha))
    ref = dense_masked_attention(q, k, v, (6, 6), 3, 'soft', alpha, 1)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v, alpha))
    assert torch.allclose(fast, ref, atol=1e-12)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, atol=1e-10)


@pytest.mark.parametrize('mode', MASK_MODES)
@pytest.mark.parametrize('h,w,p', [(3, 4, 0), (3, 4, 1), (2, 2, 0), (1, 5, 2)])
def test_gradcheck_float64(mode, h, w, p):
    q, k, v = [t.requires_grad_(True) for t in _qkv(1, 2, p + h * w, 3, scale=1.0)]
    alpha = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, alpha):
        return masked_attention(q, k, v, (h, w), 3, mode, alpha, p)
    assert torch.autograd.gradcheck(fn, (q, k, v, alpha), fast_mode=True)


def test_fast_path_gradients_match_reference():
    q, k, v = [t.requires_grad_(True) for t in _qkv(2, 2, 1 + 30, 4)]
    for mode in ('hard', 'strict'):
        g = torch.autograd.grad(masked_attention(q, k, v, (5, 6), 3, mode, None, 1).sin().sum(), (q, k, v))
        rg = torch.autograd.grad(dense_masked_attention(q, k, v, (5, 6), 3, mode, None, 1).sin().sum(), (q, k, v))
        for a, b in zip(g, rg):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', MASK_MODES)
def test_half_precision_is_finite_and_close_to_float64(dtype, mode):
    # Logits up to about 1e4 in magnitude: half-precision softmax without fp32 accumulation overflows.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 1 + 64, 8, generator=g) * 40
    k = torch.randn(1, 2, 1 + 64, 8, generator=g) * 40
    v = torch.randn(1, 2, 1 + 64, 8, generator=g)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    logits = (q.double() @ k.double().transpose(-2, -1)) / 8 ** 0.5
    assert logits.abs().max() > 1e3
    alpha = torch.tensor([0.3, 0.6])
    out = masked_attention(q, k, v, (8, 8), 3, mode, alpha.to(dtype), 1)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = dense_masked_attention(q.double(), k.double(), v.double(), (8, 8), 3, mode,
                                 alpha.to(dtype).double(), 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert (out.double() - ref).abs().max() < tol * 8  # |v| <= ~4: a few units of the output's last bit


def test_hard_mode_with_all_logits_very_negative_stays_finite():
    """Grid smaller than the mask: no non-neighbours, so exp(-m) must not enter at all."""
    q = torch.full((1, 1, 4, 2), 100.0, dtype=torch.float64)
    k = -q
    v = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    out = masked_attention(q, k, v, (2, 2))
    assert torch.isfinite(out).all()
    assert torch.allclose(out, dense_masked_attention(q, k, v, (2, 2)))


def test_no_quadratic_tensor_in_hard_and_strict(monkeypatch):
    """Forward and backward of the hard/strict paths never build an (N, N) tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n_grid = 24 * 24
    largest = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    q, k, v = [t.requires_grad_(True) for t in _qkv(1, 1, 1 + n_grid, 4, dtype=torch.float32)]
    for mode in ('hard', 'strict'):
        largest.clear()
        with Track():
            masked_attention(q, k, v, (24, 24), 3, mode, None, 1).sum().backward()
        assert max(largest) < n_grid * n_grid // 16, mode


def test_dense_attention_map_rows_sum_to_one_and_strict_is_local():
    q, k, _ = _qkv(1, 2, 20, 3)
    for mode in (None, 'hard', 'soft', 'strict'):
        a = dense_attention_map(q, k, (4, 5), 3, mode, torch.tensor([0.5, 0.5], dtype=torch.float64))
        assert torch.allclose(a.sum(-1), torch.ones(1, 2, 20, dtype=torch.float64))
    a = dense_attention_map(q, k, (4, 5), 3, 'strict')
    assert (a[..., ~neighbourhood_mask(4, 5, 3)] == 0).all()


@pytest.mark.parametrize('kwargs,match', [
    (dict(hw=(3, 3)), 'N=12 must equal'),
    (dict(mask_size=4), 'mask_size must be a positive odd'),
    (dict(mask_size=0), 'mask_size must be a positive odd'),
    (dict(mode='soft'), "mode='soft' needs alpha"),
    (dict(mode='gaussian'), 'mode must be one of'),
    (dict(num_prefix_tokens=-1), 'num_prefix_tokens must be'),
    (dict(hw=(0, 12)), 'positive grid sizes'),
    (dict(mode='soft', alpha=torch.ones(3)), r'alpha must have shape \(heads,\)'),
])
@pytest.mark.parametrize('fn', [masked_attention, dense_masked_attention])
def test_bad_arguments_raise_value_error(fn, kwargs, match):
    q, k, v = _qkv(1, 2, 12, 4, dtype=torch.float32)
    args = dict(hw=(3, 4), mask_size=3, mode='hard', alpha=None, num_prefix_tokens=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, **args)


def test_bad_shapes_raise_value_error():
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match=r'q must have shape \(B, heads, N, d\)'):
        masked_attention(q[0], q[0], q[0], (3, 4))
    with pytest.raises(ValueError, match='q, k, v must share'):
        masked_attention(q, q[:, :1], q, (3, 4))


# Grids spanning several halo tiles (of side 3 here, so that small grids have many), with tiles cut
# by the border, a grid smaller than a tile and a grid smaller than the mask.
HALO_GRIDS = [(8, 13, 0), (7, 7, 2), (9, 3, 1), (2, 5, 0), (1, 1, 1), (4, 4, 0)]


@pytest.mark.parametrize('mode', ['hard', 'strict'])
@pytest.mark.parametrize('h,w,p', HALO_GRIDS)
@pytest.mark.parametrize('mask_size', [3, 5])
def test_halo_path_and_gradients_match_dense_reference(monkeypatch, mode, h, w, p, mask_size):
    ops = importlib.import_module('hmait.ops.masked_attention')
    monkeypatch.setattr(ops, 'HALO_TILE', 3)
    q, k, v = [t.requires_grad_(True) for t in _qkv(2, 3, p + h * w, 4)]
    fast = masked_attention(q, k, v, (h, w), mask_size, mode, None, p, backend='halo')
    ref = dense_masked_attention(q, k, v, (h, w), mask_size, mode, None, p)
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, atol=1e-12, rtol=0)
    grads = torch.autograd.grad(fast.sin().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sin().sum(), (q, k, v))
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, atol=1e-10, rtol=0)


def test_halo_path_with_the_default_tile_matches_dense_reference():
    # 16x15 with tiles of 7: three by three tiles, the last ones cut by the border.
    q, k, v = _qkv(1, 2, 1 + 16 * 15, 8)
    for mode in ('hard', 'strict'):
        fast = masked_attention(q, k, v, (16, 15), 3, mode, None, 1, backend='halo')
        assert torch.allclose(fast, dense_masked_attention(q, k, v, (16, 15), 3, mode, None, 1), atol=1e-12, rtol=0)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_halo_path_half_precision_is_finite_and_close_to_float64(dtype, mode):
    # Logits beyond 1e3: the additive mask of the masked-out keys must still outweigh them.
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, 1 + 64, 8, generator=g) * 40 for _ in range(2))
    v = torch.randn(1, 2, 1 + 64, 8, generator=g)
    assert ((q @ k.transpose(-2, -1)) / 8 ** 0.5).abs().max() > 1e3
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = masked_attention(q, k, v, (8, 8), 3, mode, None, 1, backend='halo')
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = dense_masked_attention(q.double(), k.double(), v.double(), (8, 8), 3, mode, None, 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    assert (out.double() - ref).abs().max() < tol * 8


def test_halo_path_rejects_soft_mode():
    q, k, v = _qkv(1, 1, 4, 2)
    with pytest.raises(ValueError, match="backend='halo' .* cannot run this call: it implements modes 'hard'"):
        masked_attention(q, k, v, (2, 2), 3, 'soft', torch.tensor([0.5], dtype=torch.float64), backend='halo')


@pytest.mark.parametrize('h,w,p', [(2, 2, 0), (3, 3, 1), (2, 5, 0)])
def test_halo_path_hard_mode_with_very_negative_logits_matches_dense(h, w, p):
    """Own logits of -2e4: the extra key of the non-neighbours must not outweigh the neighbours where
    there are no non-neighbours (2x2, 3x3), and must carry exactly their weight where there are."""
    q = torch.full((1, 1, p + h * w, 2), 100.0, dtype=torch.float64)
    k = -q
    v = torch.randn(1, 1, p + h * w, 2, dtype=torch.float64)
    out = masked_attention(q, k, v, (h, w), 3, 'hard', None, p, backend='halo')
    assert torch.isfinite(out).all()
    assert torch.allclose(out, dense_masked_attention(q, k, v, (h, w), 3, 'hard', None, p), atol=1e-12, rtol=0)
