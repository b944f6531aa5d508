"""The global heads' paths (torch's SDPA, plain matmuls, the C++ kernel) against the unmasked dense reference."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from hmait.ops import backends, dense_attention_map, global_attention
from hmait.ops.backends import MATMUL_LIMITS, MATMUL_MAX_HEAD_DIM, choose_global

# The module itself: hmait.ops's function of the same name shadows it as an attribute.
global_attention_module = importlib.import_module('hmait.ops.global_attention')

BACKENDS = ('sdpa', 'matmul')


def _inputs(n, dtype, scale=2.0, seed=0, b=2, heads=3, d=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, heads, n, d, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
            for _ in range(3)]


def _reference(q, k, v, hw, prefix, scale):
    """float64 ``softmax(q k^T * scale) v`` from the dense reference's unmasked attention map."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = dense_attention_map(q, k, hw, mode=None, num_prefix_tokens=prefix, scale=scale) @ v
    return out, (q, k, v)


def _check(backend, dtype, scale_q, tol_out, tol_grad, scale=None):
    hw, prefix = (4, 5), 1
    q, k, v = _inputs(prefix + hw[0] * hw[1], dtype, scale=scale_q)
    out = global_attention(q, k, v, scale=scale, backend=backend)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref, ref_inputs = _reference(q, k, v, hw, prefix, scale)
    assert (out.double() - ref).abs().max() < tol_out
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, g)
    for name, got, want in zip('qkv', grads, ref_grads):
        assert torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1.0)
        assert err < tol_grad, (name, err.item())


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize('scale', [None, 0.1])
def test_backends_match_the_dense_reference_with_gradients(backend, dtype, tol, scale):
    _check(backend, dtype, scale_q=2.0, tol_out=tol * 10, tol_grad=tol * 10, scale=scale)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_backends_are_finite_and_close_to_float64(backend, dtype):
    # bf16: logits of magnitude about 1e3 (inputs scaled by 12, d 8); fp16 keeps them within its range.
    scale_q = 12.0 if dtype == torch.bfloat16 else 3.0
    q, k, _ = _inputs(21, dtype, scale=scale_q)
    logits = (q.double() @ k.double().transpose(-2, -1)) / 8 ** 0.5
    assert logits.abs().max() > (3e2 if dtype == torch.bfloat16 else 10)
    tol = 6e-2 if dtype == torch.bfloat16 else 1e-2
    _check(backend, dtype, scale_q, tol_out=tol * scale_q, tol_grad=tol)


def test_auto_takes_the_matmuls_only_for_short_cpu_sequences_and_small_maps(monkeypatch):
    # The limits as on a CPU with native bfloat16 matmuls (test_backends covers one without), and without the
    # C++ kernel, which 'auto' takes first where it runs (test_cpu_kernel_* below).
    monkeypatch.setattr(backends, '_bf16_matmul_native', lambda: True)
    monkeypatch.setattr(backends, 'cpu_kernel_status', lambda: (False, 'not built in this test'))
    for dtype, limits in MATMUL_LIMITS.items():
        for mode, (tokens, logits) in limits.items():
            def backend(b, n, dtype=dtype, grad=mode == 'train'):
                return choose_global(torch.empty(b, 1, n, 8, dtype=dtype, requires_grad=grad)).backend
            assert backend(1, tokens) == 'matmul', (dtype, mode)
            assert backend(1, tokens + 1) == 'sdpa', (dtype, mode)
            # The same length with a batch whose logits map is over the limit.
            assert backend(logits // tokens ** 2, tokens) == 'matmul', (dtype, mode)
            assert backend(logits // tokens ** 2 + 1, tokens) == 'sdpa', (dtype, mode)
    # Training limits need grad mode as well as an input that requires gradients.
    n = MATMUL_LIMITS[torch.bfloat16]['train'][0]
    assert n > MATMUL_LIMITS[torch.bfloat16]['eval'][0]
    q = torch.empty(1, 1, n, 8, dtype=torch.bfloat16, requires_grad=True)
    assert choose_global(q).backend == 'matmul'
    with torch.no_grad():
        assert choose_global(q).backend == 'sdpa'
    assert choose_global(q.detach(), q.detach(), q).backend == 'matmul'
    for dtype in (torch.float16, torch.float64):
        assert choose_global(torch.empty(1, 1, 16, 8, dtype=dtype)).backend == 'sdpa'
    assert choose_global(torch.empty(1, 1, 16, MATMUL_MAX_HEAD_DIM)).backend == 'matmul'
    assert choose_global(torch.empty(1, 1, 16, MATMUL_MAX_HEAD_DIM + 1)).backend == 'sdpa'
    assert choose_global(torch.empty(1, 1, 16, 8, device='meta')).backend == 'sdpa'


def test_auto_runs_the_backend_it_picks(monkeypatch):
    calls, sdpa = [], F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape[-2])
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(global_attention_module.F, 'scaled_dot_product_attention', counting_sdpa)
    limit = MATMUL_LIMITS[torch.float32]['eval'][0]
    with torch.no_grad():
        for n in (limit, limit + 1):
            global_attention(*_inputs(n, torch.float32, b=1, heads=1))
    assert calls == [limit + 1]


@pytest.mark.parametrize('backend', BACKENDS)
def test_autocast_gives_both_backends_the_autocast_dtype(backend, monkeypatch):
    """float32 inputs under bf16 autocast: both backends compute in bf16, as SDPA does there, and 'auto'
    picks by bf16's limits (this length is past float32's evaluation limit, inside bf16's)."""
    monkeypatch.setattr(backends, '_bf16_matmul_native', lambda: True)
    n = MATMUL_LIMITS[torch.float32]['eval'][0] + 4
    assert n <= MATMUL_LIMITS[torch.bfloat16]['eval'][0]
    q, k, v = (t.detach() for t in _inputs(n, torch.float32, scale=1.0))
    ref = global_attention(q.double(), k.double(), v.double())
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert choose_global(q.bfloat16()).backend == 'matmul'
        out = global_attention(q, k, v, backend=backend)
    assert out.dtype == torch.bfloat16
    assert (out.double() - ref).abs().max() < 3e-2


@pytest.mark.parametrize('backend', BACKENDS)
def test_dropout_zeroes_probabilities_and_rescales_the_rest(backend):
    """q = k = 0 makes every probability 1/N; v = identity reads them back one by one."""
    b, heads, n, p = 2, 2, 32, 0.25
    q = torch.zeros(b, heads, n, 8, dtype=torch.float64, requires_grad=True)
    v = torch.eye(n, dtype=torch.float64).expand(b, heads, n, n).clone().requires_grad_()
    torch.manual_seed(0)
    out = global_attention(q, q, v, dropout_p=p, backend=backend)
    kept = out != 0
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (n * (1 - p))))
    assert 0.15 < 1 - kept.double().mean().item() < 0.35
    (grad_v,) = torch.autograd.grad(out.sum(), v)
    # Each value row gets the kept probabilities of its column.
    torch.testing.assert_close(grad_v, out.transpose(-2, -1).sum(-1, keepdim=True).expand_as(v))


def test_forced_matmuls_run_where_autocast_does_not_exist():
    q = torch.empty(1, 2, 5, 4, device='meta')
    assert global_attention(q, q, q, backend='matmul').shape == (1, 2, 5, 4)


class _Global(torch.nn.Module):
    def forward(self, q, k, v):
        return global_attention(q, k, v)


def test_export_keeps_sdpa_so_the_graph_does_not_depend_on_the_length():
    q, k, v = (t.detach() for t in _inputs(16, torch.float32))
    assert choose_global(q).backend == 'matmul'  # what eager mode takes at this length
    n = torch.export.Dim('n', min=2, max=1024)
    exported = torch.export.export(_Global(), (q, k, v), dynamic_shapes=({2: n}, {2: n}, {2: n}))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == 'call_function'}
    assert any('scaled_dot_product' in t for t in targets), targets
    longer = [t.detach() for t in _inputs(600, torch.float32, seed=1)]
    torch.testing.assert_close(exported.module()(*longer), global_attention(*longer, backend='sdpa'))


def test_unknown_backend_is_refused():
    q, k, v = _inputs(4, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of .*'matmul'.*got 'flash'"):
        global_attention(q, k, v, backend='flash')


# ---- the C++ kernel of the global heads (backend 'cpu'), forward and backward ----

def _require_cpu_kernel():
    from hmait.ops import cpu_kernel
    if not cpu_kernel.is_available():
        pytest.skip(f'CPU kernel unavailable: {cpu_kernel.cpu_kernel_status()[1]}')
    return cpu_kernel


def _packed(b, n, n_keys, heads, d, dtype, scale, seed):
    """q, k, v as (B, heads, N, d) strided views of packed projections, as a model hands them over."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, max(n, n_keys), 3, heads, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    return qkv[:, :n, 0].transpose(1, 2), qkv[:, :n_keys, 1].transpose(1, 2), qkv[:, :n_keys, 2].transpose(1, 2)


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 2e-6), (torch.bfloat16, 8e-3), (torch.float16, 1.5e-3)])
def test_cpu_kernel_matches_the_dense_reference_in_every_variant(dtype, tol):
    cpu_kernel = _require_cpu_kernel()
    # Query and key counts around the vector widths (4, 8, 16 lanes) and the blocks of four queries,
    # keys as pooled heads have them (fewer than the queries), a single key, a long row, and head size 64.
    shapes = [(2, 21, 21, 3, 32), (1, 70, 17, 2, 32), (2, 5, 1, 2, 32), (1, 9, 300, 1, 32), (2, 13, 33, 2, 64),
              (1, 1, 16, 1, 64)]
    for i, (b, n, n_keys, heads, d) in enumerate(shapes):
        q, k, v = (t.detach().requires_grad_() for t in _packed(b, n, n_keys, heads, d, dtype, scale=1.5, seed=i))
        grad_out = torch.randn(b, heads, n, d, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
        if n == n_keys:  # the dense reference's unmasked map; with other key counts, SDPA's float64 math
            want = dense_attention_map(ref_inputs[0], ref_inputs[1], (1, n), mode=None, scale=0.3) @ ref_inputs[2]
        else:
            want = F.scaled_dot_product_attention(*ref_inputs, scale=0.3)
        want_grads = torch.autograd.grad(want, ref_inputs, grad_out)
        for isa in ('default', 'avx2', 'avx512', 'avx512_bf16'):
            try:
                cpu_kernel.kernel_isa(isa)
            except RuntimeError as err:
                assert 'not available' in str(err)
                continue
            try:
                got = global_attention(q, k, v, scale=0.3, backend='cpu')
                grads = torch.autograd.grad(got, (q, k, v), grad_out.to(dtype))
            finally:
                cpu_kernel.kernel_isa('best')
            where = (isa, dtype, (b, n, n_keys, heads, d))
            assert got.shape == want.shape and got.dtype == dtype
            assert (got.double() - want).abs().max() < tol * want.abs().max(), where
            # Relative to the gradients' scale (with one key, q and k get no gradient, only rounding).
            scale = max(max(w.abs().max().item() for w in want_grads), 1.0)
            for name, g, w in zip('qkv', grads, want_grads):
                assert g.dtype == dtype and g.shape == w.shape
                assert (g.double() - w).abs().max() < 4 * tol * scale, (*where, name)


def test_cpu_kernel_keeps_float32_logits_for_half_precision_inputs():
    """Logits near 1e3 from bfloat16 inputs: rounding them to bfloat16 would move them by up to 4 (and the
    probabilities by factors of e^4); the kernel's float32 logits leave only the output's rounding."""
    _require_cpu_kernel()
    q, k, v = _packed(2, 21, 21, 3, 32, torch.bfloat16, scale=10.0, seed=5)
    logits = q.double() @ k.double().transpose(-2, -1) / 32 ** 0.5
    assert logits.abs().max() > 3e2
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.no_grad():
        got = global_attention(q, k, v, backend='cpu')
    assert (got.double() - want).abs().max() < 8e-3 * want.abs().max()


def test_auto_takes_the_cpu_kernel_and_says_why(monkeypatch):
    _require_cpu_kernel()
    q, k, v = _packed(2, 30, 30, 2, 32, torch.float32, scale=1.0, seed=0)
    assert choose_global(q, k, v) == ('cpu', 'on CPU: the compiled C++ kernel of the global heads')
    assert choose_global(q.detach().requires_grad_(), k, v).backend == 'cpu'  # it has a backward
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert global_attention(q, k, v).dtype == torch.bfloat16
        assert choose_global(q.bfloat16()).backend == 'cpu'
    # Where it cannot run, 'auto' goes on to the matmuls or SDPA, and a request for it says why.
    cases = [((q[..., :16], k[..., :16], v[..., :16]), {}, r'head sizes \(32, 64\) \(q, k and v alike\), got \[16\]'),
             ((q, k, v[..., :16]), {}, r'got \[16, 32\]'),
             ((q.double(), k.double(), v.double()), {}, 'takes .*got torch.float64'),
             ((q, k, v), {'bias': True}, 'no additive bias'),
             ((q, k, v), {'dropout_p': 0.1}, 'applies no dropout'),
             ((q.to('meta'), k.to('meta'), v.to('meta')), {}, 'takes CPU tensors, got a tensor on meta')]
    for args, kwargs, reason in cases:
        assert choose_global(*args, **kwargs).backend != 'cpu', reason
        with pytest.raises(ValueError, match=f"backend='cpu' .*cannot run this call: .*{reason}"):
            choose_global(*args, backend='cpu', **kwargs)
    # A kernel that was not built: 'auto' falls back, a request is a RuntimeError naming the cause.
    monkeypatch.setattr(backends, 'cpu_kernel_status', lambda: (False, 'not built here'))
    assert choose_global(q, k, v).backend == 'matmul'
    with pytest.raises(RuntimeError, match=r'unavailable \(not built here\)'):
        choose_global(q, k, v, backend='cpu')


def test_auto_runs_the_cpu_kernel_with_and_without_gradients(monkeypatch):
    cpu_kernel = _require_cpu_kernel()
    calls, real = [], cpu_kernel.global_attention_cpu
    monkeypatch.setattr(cpu_kernel, 'global_attention_cpu', lambda *a: calls.append(a[0].shape) or real(*a))
    q, k, v = _packed(1, 12, 12, 2, 32, torch.float32, scale=1.0, seed=1)
    with torch.no_grad():
        out = global_attention(q, k, v)
    torch.testing.assert_close(out, global_attention(q, k, v, backend='matmul'))
    assert calls == [q.shape]
    q = q.detach().requires_grad_()
    global_attention(q, k, v).sum().backward()
    assert len(calls) == 2 and q.grad is not None and torch.isfinite(q.grad).all()
