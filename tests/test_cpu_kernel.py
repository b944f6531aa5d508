"""The compiled CPU kernels of the hard and strict masked heads against the dense reference.

The kernel is built (or loaded from its cache) by the first test that needs it. A kernel that
cannot be built fails these tests: the reason reported by ``cpu_kernel_status`` is in the message.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from hmait.ops import dense_masked_attention
from hmait.ops import masked_attention as torch_masked_attention
from hmait.ops.cpu_kernel import (
    cpu_kernel_status,
    kernel_isa,
    masked_attention_bnhd,
    masked_attention_cpu,
    masked_attention_qkv_cpu,
)
from hmait.ops.masked_attention import qkv_heads

REPO = Path(__file__).resolve().parents[1]

GRIDS = [(1, 1), (2, 2), (3, 3), (4, 4), (1, 7), (5, 3), (7, 9)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (atol = rtol) for the output and for the gradients, against a float64 reference on the same inputs.
TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 2e-5), torch.bfloat16: (1e-2, 2e-2),
             torch.float16: (2e-3, 5e-3)}


@pytest.fixture(scope='module', autouse=True)
def kernel():
    available, reason = cpu_kernel_status()
    assert available, f'the CPU kernel must build here: {reason}'
    yield
    kernel_isa('best')


def _random(shape, dtype, gen, std=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def _reference(q, k, v, hw, mask_size, mode, prefix, grad_out, scale=None):
    """Output and gradients of the dense float64 reference on the same (rounded) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = dense_masked_attention(q64, k64, v64, hw, mask_size, mode, num_prefix_tokens=prefix, scale=scale)
    grads = torch.autograd.grad(out, (q64, k64, v64), grad_out.double())
    return out, grads


def _kernel(q, k, v, hw, mask_size, mode, prefix, grad_out, scale=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = masked_attention_cpu(q, k, v, hw, mask_size, mode, prefix, scale)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def _assert_matches(got, want, dtype, what):
    out_tol, grad_tol = TOLERANCE[dtype]
    out, grads = got
    ref, ref_grads = want
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=out_tol, rtol=out_tol, msg=lambda m: f'{what}, output: {m}')
    for name, g, r in zip('qkv', grads, ref_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), r, atol=grad_tol, rtol=grad_tol,
                                   msg=lambda m, name=name: f'{what}, grad {name}: {m}')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('mask_size', [3, 5])
@pytest.mark.parametrize('prefix', [0, 1, 2])
@pytest.mark.parametrize('hw', GRIDS, ids=lambda hw: f'{hw[0]}x{hw[1]}')
@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_matches_dense_reference(mode, hw, prefix, mask_size, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(f'{mode} {hw} {prefix} {mask_size}'.encode()))
    n = prefix + hw[0] * hw[1]
    q, k, v = (_random((2, 3, n, 8), dtype, gen) for _ in range(3))
    grad_out = _random((2, 3, n, 8), dtype, gen)
    got = _kernel(q, k, v, hw, mask_size, mode, prefix, grad_out)
    want = _reference(q, k, v, hw, mask_size, mode, prefix, grad_out)
    _assert_matches(got, want, dtype, f'{mode} {hw} prefix={prefix} mask={mask_size} {dtype}')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('head_dim', [32, 64])
@pytest.mark.parametrize('hw', [(3, 3), (4, 4), (5, 3), (7, 9), (2, 6)], ids=lambda hw: f'{hw[0]}x{hw[1]}')
@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_interior_fast_path_matches_dense_reference(mode, hw, head_dim, dtype):
    # Head sizes with a compile-time specialisation, mask 3 and no prefix tokens: queries whose box the
    # border does not cut take the kernel's fast path, the others the general one.
    gen = torch.Generator().manual_seed(zlib.crc32(f'fast {mode} {hw} {head_dim}'.encode()))
    n = hw[0] * hw[1]
    q, k, v = (_random((2, 3, n, head_dim), dtype, gen) for _ in range(3))
    grad_out = _random((2, 3, n, head_dim), dtype, gen)
    got = _kernel(q, k, v, hw, 3, mode, 0, grad_out)
    want = _reference(q, k, v, hw, 3, mode, 0, grad_out)
    _assert_matches(got, want, dtype, f'fast path {mode} {hw} d={head_dim} {dtype}')


@pytest.mark.parametrize('dtype', DTYPES, ids=str)
@pytest.mark.parametrize('hw,prefix,mask_size,head_dim', [((7, 9), 0, 3, 32), ((5, 3), 2, 3, 8), ((4, 4), 1, 5, 16),
                                                          ((1, 7), 0, 3, 64)], ids=str)
@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_packed_qkv_matches_dense_reference(mode, hw, prefix, mask_size, head_dim, dtype):
    # The packed op reads q, k, v from a head slice of a (B, N, 3, heads, d) projection and writes the
    # gradient of the whole slice in one piece; both the fast path (d 32 and 64, no prefix) and the
    # general one are covered.
    gen = torch.Generator().manual_seed(zlib.crc32(f'packed {mode} {hw} {prefix} {mask_size} {head_dim}'.encode()))
    b, heads, masked = 2, 5, 3
    n = prefix + hw[0] * hw[1]
    projection = _random((b, n, 3, heads, head_dim), dtype, gen).requires_grad_()
    qkv = projection[:, :, :, :masked]  # the masked heads of a mixed stage: a strided slice
    grad_out = _random((b, n, masked, head_dim), dtype, gen)
    out = masked_attention_qkv_cpu(qkv, hw, mask_size, mode, prefix)
    assert out.shape == (b, n, masked, head_dim) and out.is_contiguous()
    (grad_projection,) = torch.autograd.grad(out, projection, grad_out)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    want = _reference(q, k, v, hw, mask_size, mode, prefix, grad_out.transpose(1, 2))
    grads = [grad_projection[:, :, i, :masked].transpose(1, 2) for i in range(3)]
    _assert_matches((out.transpose(1, 2), grads), want, dtype, f'packed {mode} {hw} prefix={prefix} {dtype}')
    assert grad_projection[:, :, :, masked:].abs().max() == 0  # the other heads get nothing from here


def test_hard_and_strict_differ():
    # Guards the comparison above against a kernel that ignores the mode.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_random((1, 2, 16, 8), torch.float64, gen) for _ in range(3))
    hard = masked_attention_cpu(q, k, v, (4, 4), 3, 'hard')
    strict = masked_attention_cpu(q, k, v, (4, 4), 3, 'strict')
    assert (hard - strict).abs().max() > 1e-2


@pytest.mark.parametrize('head_dim,value_dim', [(32, 32), (64, 64), (5, 5), (8, 12), (48, 48)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=str)
def test_head_sizes(head_dim, value_dim, dtype):
    # 32 and 64 have compile-time specialisations; the others take the generic path (with a tail).
    gen = torch.Generator().manual_seed(head_dim * 100 + value_dim)
    hw, prefix = (6, 5), 1
    n = prefix + hw[0] * hw[1]
    q, k = (_random((2, 2, n, head_dim), dtype, gen) for _ in range(2))
    v = _random((2, 2, n, value_dim), dtype, gen)
    grad_out = _random((2, 2, n, value_dim), dtype, gen)
    for mode in ('hard', 'strict'):
        got = _kernel(q, k, v, hw, 3, mode, prefix, grad_out)
        want = _reference(q, k, v, hw, 3, mode, prefix, grad_out)
        _assert_matches(got, want, dtype, f'{mode} d={head_dim} d_v={value_dim}')


def test_scale_argument():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_random((1, 2, 1 + 20, 8), torch.float64, gen) for _ in range(3))
    grad_out = _random((1, 2, 21, 8), torch.float64, gen)
    got = _kernel(q, k, v, (4, 5), 3, 'hard', 1, grad_out, scale=0.7)
    want = _reference(q, k, v, (4, 5), 3, 'hard', 1, grad_out, scale=0.7)
    _assert_matches(got, want, torch.float64, 'scale=0.7')


def test_matches_torch_path_at_stage_shape():
    # A larger case: the portable PyTorch path of masked_attention is the comparison.
    gen = torch.Generator().manual_seed(2)
    q, k, v = (_random((2, 3, 14 * 14, 32), torch.float32, gen).requires_grad_() for _ in range(3))
    for mode in ('hard', 'strict'):
        want = torch_masked_attention(q, k, v, (14, 14), 3, mode, backend='torch')
        got = masked_attention_cpu(q, k, v, (14, 14), 3, mode)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        grad_out = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
        got_grads = torch.autograd.grad(got, (q, k, v), grad_out)
        for g, r in zip(got_grads, want_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('hw,prefix,mask_size,mode', [
    ((1, 1), 0, 3, 'hard'), ((1, 1), 1, 3, 'strict'), ((2, 3), 0, 3, 'hard'), ((2, 3), 2, 3, 'hard'),
    ((3, 3), 1, 3, 'strict'), ((3, 3), 1, 5, 'hard'), ((1, 4), 1, 3, 'hard'), ((3, 2), 0, 5, 'strict'),
])
def test_gradcheck(hw, prefix, mask_size, mode):
    gen = torch.Generator().manual_seed(3)
    n = prefix + hw[0] * hw[1]
    q, k, v = (_random((1, 1, n, 3), torch.float64, gen).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda q, k, v: masked_attention_cpu(q, k, v, hw, mask_size, mode, prefix), (q, k, v))


def test_strided_views_of_qkv():
    # The layout of the attention module: one (B, N, 3 * C) projection viewed as (B, N, 3, heads, d).
    gen = torch.Generator().manual_seed(4)
    b, heads, d, hw, prefix = 2, 4, 16, (5, 6), 2
    n = prefix + hw[0] * hw[1]
    qkv = _random((b, n, 3 * heads * d), torch.float32, gen).requires_grad_()
    parts = qkv.view(b, n, 3, heads, d)
    masked = 3  # the first heads are masked, as in MaskedMultiheadAttention
    q, k, v = (parts[:, :, i, :masked] for i in range(3))
    assert not q.is_contiguous()
    out = masked_attention_bnhd(q, k, v, hw, 3, 'hard', prefix)
    assert out.shape == (b, n, masked, d) and out.is_contiguous()
    flat = out.view(b, n, masked * d)  # what the output projection reads, without a copy
    assert flat.data_ptr() == out.data_ptr()

    ref_q, ref_k, ref_v = (t.detach().double().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = dense_masked_attention(ref_q, ref_k, ref_v, hw, 3, 'hard', num_prefix_tokens=prefix)
    torch.testing.assert_close(out.double(), ref.transpose(1, 2), atol=1e-5, rtol=1e-5)

    grad_out = torch.randn(out.shape, generator=gen)
    (grad_qkv,) = torch.autograd.grad(out, qkv, grad_out)
    ref_grads = torch.autograd.grad(ref, (ref_q, ref_k, ref_v), grad_out.double().transpose(1, 2))
    grad_parts = grad_qkv.view(b, n, 3, heads, d)
    for i, ref_grad in enumerate(ref_grads):
        torch.testing.assert_close(grad_parts[:, :, i, :masked].double(), ref_grad.transpose(1, 2), atol=1e-5,
                                   rtol=1e-5)
        assert grad_parts[:, :, i, masked:].abs().max() == 0  # the unmasked heads get nothing from here


def test_channel_strided_inputs():
    # A channel stride other than 1 is accepted (the op makes that input contiguous).
    gen = torch.Generator().manual_seed(5)
    q, k, v = (_random((1, 12, 2, 8), torch.float64, gen) for _ in range(3))
    q_strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_strided.stride(-1) != 1
    q_strided.requires_grad_()
    out = masked_attention_bnhd(q_strided, k, v, (3, 4), 3, 'hard')
    torch.testing.assert_close(out, masked_attention_bnhd(q, k, v, (3, 4), 3, 'hard'))
    q.requires_grad_()
    (grad_strided,) = torch.autograd.grad(out, q_strided, torch.ones_like(out))
    (grad,) = torch.autograd.grad(masked_attention_bnhd(q, k, v, (3, 4), 3, 'hard'), q, torch.ones_like(out))
    assert grad_strided.is_contiguous()  # the kernel writes channels with unit stride
    torch.testing.assert_close(grad_strided, grad)


def test_gradients_are_laid_out_like_the_inputs():
    # Head planes ((B, heads, N, d) tensors) get head-plane gradients, token-major views of a projection a
    # contiguous token-major gradient; the values are checked against the dense reference elsewhere.
    gen = torch.Generator().manual_seed(11)
    q, k, v = (_random((2, 3, 20, 8), torch.float32, gen).requires_grad_() for _ in range(3))
    out = masked_attention_cpu(q, k, v, (4, 5), 3, 'hard')
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(g.stride() == t.stride() for g, t in zip(grads, (q, k, v)))
    parts = _random((2, 20, 3, 3, 8), torch.float32, gen).requires_grad_()
    views = [parts[:, :, i].transpose(1, 2) for i in range(3)]
    out = masked_attention_cpu(*views, (4, 5), 3, 'hard')
    grads = torch.autograd.grad(out, views, torch.ones_like(out))
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_large_logits_stay_finite(dtype, mode):
    # Logits of magnitude ~1e3 overflow float16 arithmetic; float32 accumulation keeps them finite.
    gen = torch.Generator().manual_seed(6)
    hw, prefix = (6, 6), 1
    n = prefix + hw[0] * hw[1]
    q, k = (_random((1, 2, n, 16), dtype, gen, std=16.0) for _ in range(2))
    v = _random((1, 2, n, 16), dtype, gen)
    grad_out = _random((1, 2, n, 16), dtype, gen)
    got_out, got_grads = _kernel(q, k, v, hw, 3, mode, prefix, grad_out)
    ref_out, ref_grads = _reference(q, k, v, hw, 3, mode, prefix, grad_out)
    assert ((q.double() @ k.double().transpose(-1, -2)) / 4).abs().max() > 500
    assert torch.isfinite(got_out).all() and all(torch.isfinite(g).all() for g in got_grads)
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(got_out.double(), ref_out, atol=tol, rtol=tol)
    # Near one-hot softmax: gradients are large and sharp, compare relative to their scale.
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=tol * (1 + r.abs().max().item()), rtol=tol)


def test_every_instruction_set_variant():
    # The variants the CPU supports must agree with the reference (the automatic choice is the widest).
    # With a prefix token every query takes the general path; without, interior queries take the fast
    # path, whose vector width differs per variant (bfloat16 there reads channels in pairs).
    gen = torch.Generator().manual_seed(7)
    hw = (7, 9)
    tested = []
    for dtype, prefix in itertools.product((torch.float32, torch.bfloat16, torch.float16), (1, 0)):
        n = prefix + hw[0] * hw[1]
        q, k, v = (_random((2, 3, n, 32), dtype, gen) for _ in range(3))
        grad_out = _random((2, 3, n, 32), dtype, gen)
        want = _reference(q, k, v, hw, 3, 'hard', prefix, grad_out)
        for isa in ('default', 'avx2', 'avx512', 'avx512_bf16'):
            try:
                kernel_isa(isa)
            except RuntimeError as err:
                assert 'not available' in str(err)
                continue
            try:
                _assert_matches(_kernel(q, k, v, hw, 3, 'hard', prefix, grad_out), want, dtype,
                                f'{isa} {dtype} prefix={prefix}')
            finally:
                kernel_isa('best')
            tested.append(isa)
    assert 'default' in tested
    with pytest.raises(RuntimeError, match='requested must be'):
        kernel_isa('sse9')


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(8)
    b, heads, d, hw, prefix = 2, 3, 8, (4, 5), 1
    n = prefix + hw[0] * hw[1]
    x = _random((b, n, 16), torch.float32, gen)
    weight = _random((3 * heads * d, 16), torch.float32, gen).requires_grad_()

    def attention(x, weight):
        qkv = (x @ weight.t()).view(b, n, 3, heads, d)
        out = masked_attention_bnhd(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], hw, 3, 'hard', prefix)
        return out.view(b, n, heads * d).square().sum()

    eager = attention(x, weight)
    (eager_grad,) = torch.autograd.grad(eager, weight)
    for backend in ('aot_eager', 'inductor'):
        torch._dynamo.reset()
        compiled = torch.compile(attention, fullgraph=True, backend=backend)
        got = compiled(x, weight)
        (got_grad,) = torch.autograd.grad(got, weight)
        torch.testing.assert_close(got, eager, msg=lambda m, backend=backend: f'{backend}: {m}')
        torch.testing.assert_close(got_grad, eager_grad, msg=lambda m, backend=backend: f'{backend}: {m}')


def test_opcheck():
    # Schema, fake (meta) kernel and autograd registration agree with the real kernel.
    gen = torch.Generator().manual_seed(9)
    q, k, v = (_random((1, 13, 2, 8), torch.float32, gen).requires_grad_() for _ in range(3))
    torch.library.opcheck(torch.ops.hmait.masked_attention_cpu_fwd.default, (q, k, v, 3, 4, 1, 3, True, 0.35))
    out, lse = torch.ops.hmait.masked_attention_cpu_fwd(q, k, v, 3, 4, 1, 3, False, 0.35)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(torch.ops.hmait.masked_attention_cpu_bwd.default,
                          (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse, 3, 4, 1, 3, False, 0.35))
    # Head planes seen as (B, N, heads, d): the gradients keep that layout, in the fake kernel too.
    planes = [t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.hmait.masked_attention_cpu_bwd.default,
                          (grad_out, *planes, out.detach(), lse, 3, 4, 1, 3, True, 0.35))


def test_opcheck_packed_qkv():
    gen = torch.Generator().manual_seed(10)
    qkv = _random((1, 13, 3, 2, 8), torch.float32, gen).requires_grad_()
    torch.library.opcheck(torch.ops.hmait.masked_attention_cpu_qkv_fwd.default, (qkv, 3, 4, 1, 3, True, 0.35))
    out, lse = torch.ops.hmait.masked_attention_cpu_qkv_fwd(qkv, 3, 4, 1, 3, False, 0.35)
    torch.library.opcheck(torch.ops.hmait.masked_attention_cpu_qkv_bwd.default,
                          (torch.randn_like(out), qkv.detach(), out.detach(), lse, 3, 4, 1, 3, False, 0.35))


def test_argument_errors():
    with pytest.raises(ValueError, match=r'qkv must have shape \(B, N, 3, heads, d\), got shape \(1, 10, 2, 2, 8\)'):
        masked_attention_qkv_cpu(torch.randn(1, 10, 2, 2, 8), (3, 3), 3, 'hard', 1)
    with pytest.raises(RuntimeError, match=r'qkv must have shape \(B, N, 3, heads, d\)'):
        torch.ops.hmait.masked_attention_cpu_qkv_fwd(torch.randn(1, 10, 4, 8), 3, 3, 1, 3, True, 0.3)
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match='mode'):
        masked_attention_cpu(q, q, q, (3, 3), 3, 'soft', 1)
    with pytest.raises(ValueError, match='mask_size'):
        masked_attention_cpu(q, q, q, (3, 3), 4, 'hard', 1)
    with pytest.raises(RuntimeError, match='token count N=10'):
        masked_attention_cpu(q, q, q, (3, 3), 3, 'hard', 0)
    with pytest.raises(RuntimeError, match='share a dtype'):
        masked_attention_cpu(q, q.double(), q, (3, 3), 3, 'hard', 1)


def _status_in_subprocess(tmp_path: Path, env: dict) -> str:
    script = textwrap.dedent("""
        import sys
        import hmait
        assert 'hmait.ops.cpu_kernel' not in sys.modules, 'import hmait must not import the CPU kernel'
        from hmait.ops.cpu_kernel import cpu_kernel_status
        available, reason = cpu_kernel_status()
        print('AVAILABLE' if available else 'UNAVAILABLE')
        print(reason)
    """)
    full_env = {**os.environ, 'PYTHONPATH': str(REPO), 'HMAIT_EXTENSION_DIR': str(tmp_path / 'ext'), **env}
    proc = subprocess.run([sys.executable, '-c', script], env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_status_reports_missing_compiler(tmp_path):
    missing = str(tmp_path / 'no-such-compiler')
    stdout = _status_in_subprocess(tmp_path, {'CXX': missing})
    assert stdout.startswith('UNAVAILABLE'), stdout
    assert 'no C++ compiler' in stdout and missing in stdout


def test_status_reports_build_failure(tmp_path):
    broken = tmp_path / 'broken-c++'
    broken.write_text('#!/bin/sh\necho "error: this compiler always fails" >&2\nexit 1\n')
    broken.chmod(0o755)
    stdout = _status_in_subprocess(tmp_path, {'CXX': str(broken)})
    assert stdout.startswith('UNAVAILABLE'), stdout
    assert 'building the extension failed' in stdout


# ---- selection by hmait.ops.masked_attention ----

class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every aten/custom op that runs under it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _qkv(prefix: int = 1, grid=(5, 6), dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    n = prefix + grid[0] * grid[1]
    return [torch.randn(2, 3, n, 16, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_auto_selects_the_kernel_on_cpu_and_torch_forces_the_fallback(mode):
    q, k, v = _qkv()
    with _OpNames() as auto:
        out = torch_masked_attention(q, k, v, (5, 6), 3, mode, num_prefix_tokens=1)
    with _OpNames() as portable:
        ref = torch_masked_attention(q, k, v, (5, 6), 3, mode, num_prefix_tokens=1, backend='torch')
    assert any('masked_attention_cpu_fwd' in name for name in auto.names)
    assert not any('hmait' in name for name in portable.names)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch_masked_attention(q, k, v, (5, 6), 3, mode, num_prefix_tokens=1,
                                                           backend='cpu'), atol=0, rtol=0)


@pytest.mark.parametrize('mode', ['hard', 'strict', 'soft'])
def test_packed_entry_point_matches_every_backend(mode):
    from hmait.ops import masked_attention_qkv

    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 31, 3, 3, 16, generator=gen, requires_grad=True)
    alpha = torch.full((3,), 0.4) if mode == 'soft' else None
    grad_out = torch.randn(2, 31, 3, 16, generator=gen)
    results = {}
    for backend in ('auto', 'torch'):
        with _OpNames() as ops:
            out = masked_attention_qkv(qkv, (5, 6), 3, mode, alpha, num_prefix_tokens=1, backend=backend)
        (grad,) = torch.autograd.grad(out, qkv, grad_out)
        results[backend] = out, grad
        uses_kernel = any('masked_attention_cpu_qkv_fwd' in name for name in ops.names)
        assert uses_kernel == (backend == 'auto' and mode != 'soft'), (backend, mode)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ref = torch_masked_attention(q, k, v, (5, 6), 3, mode, alpha, num_prefix_tokens=1, backend='torch')
    torch.testing.assert_close(results['torch'][0], ref.transpose(1, 2))
    torch.testing.assert_close(results['auto'][0], results['torch'][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results['auto'][1], results['torch'][1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r'qkv must have shape \(B, N, 3, heads, d\), got shape \(2, 31, 9, 16\)'):
        masked_attention_qkv(qkv.reshape(2, 31, 9, 16), (5, 6), 3, mode, alpha, num_prefix_tokens=1)
    with pytest.raises(ValueError, match='token count N=31'):
        masked_attention_qkv(qkv, (5, 6), 3, mode, alpha)


def test_soft_mode_and_export_keep_the_portable_path():
    from hmait.models import MaskedAttentionBlock

    q, k, v = _qkv()
    with _OpNames() as soft:
        torch_masked_attention(q, k, v, (5, 6), 3, 'soft', torch.full((3,), 0.5), num_prefix_tokens=1)
    assert not any('hmait' in name for name in soft.names)
    with pytest.raises(ValueError, match="backend='cpu' .* cannot run this call: it implements modes 'hard'"):
        torch_masked_attention(q, k, v, (5, 6), 3, 'soft', torch.full((3,), 0.5), 1, backend='cpu')
    block = MaskedAttentionBlock(32, num_heads=4, num_masked_heads=2).eval()
    exported = torch.export.export(block, (torch.randn(2, 12, 32), (3, 4)))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == 'call_function']
    assert targets and not any('hmait' in t for t in targets), targets


def test_fully_masked_stage_writes_the_projection_input_without_a_copy():
    from hmait.models import MaskedMultiheadAttention

    attn = MaskedMultiheadAttention(48, num_heads=3, num_masked_heads=3).eval()
    x = torch.randn(2, 5 * 6, 48)
    with torch.no_grad(), _OpNames() as ops:
        out = attn(x, (5, 6))
    # qkv linear, the kernel, proj: no copy, cat or clone of the heads' output in between.
    assert not any(name.split('.')[1] in ('cat', 'clone', 'copy_', '_unsafe_view') for name in ops.names
                   if name.startswith('aten.')), ops.names
    with torch.no_grad():
        q, k, v = qkv_heads(attn._qkv(x))
        ref = attn.proj(torch_masked_attention(q, k, v, (5, 6), backend='torch').transpose(1, 2).reshape(2, 30, 48))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('masked', [0, 2, 4])
def test_attention_backward_assembles_the_qkv_gradient_without_zero_filled_copies(masked):
    from hmait.models import MaskedMultiheadAttention

    torch.manual_seed(0)
    attn = MaskedMultiheadAttention(64, num_heads=4, num_masked_heads=masked)
    x = torch.randn(2, 5 * 6, 64, requires_grad=True)
    out = attn(x, (5, 6))
    grad_out = torch.randn_like(out)
    with _OpNames() as ops:
        out.backward(grad_out)
    names = [name.split('.')[1] for name in ops.names if name.startswith('aten.')]
    # Slicing q, k and v apart would show up as slice_backward (a zero-filled full-size gradient each).
    assert 'slice_backward' not in names and 'zeros' not in names, names
    assert names.count('cat') == (1 if 0 < masked < 4 else 0), names
    # The kernel writes the masked heads' packed gradient itself; only the global heads' q, k, v
    # gradients are stacked.
    assert names.count('stack') == (1 if masked < 4 else 0), names
    assert any('masked_attention_cpu_qkv_bwd' in name for name in ops.names) == (masked > 0), ops.names

    # Output and gradient match the heads computed one by one, the masked ones by the portable path.
    grad_kernel, x.grad = x.grad, None
    q, k, v = qkv_heads(attn._qkv(x))
    heads = []
    if masked:
        heads.append(torch_masked_attention(q[:, :masked], k[:, :masked], v[:, :masked], (5, 6), backend='torch'))
    if masked < 4:
        heads.append(torch.nn.functional.scaled_dot_product_attention(q[:, masked:], k[:, masked:], v[:, masked:]))
    ref = attn.proj(torch.cat(heads, dim=1).transpose(1, 2).reshape(2, 30, 64))
    ref.backward(grad_out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_kernel, x.grad, atol=1e-4, rtol=1e-4)


def test_missing_kernel_warns_once_and_falls_back(tmp_path):
    script = textwrap.dedent("""
        import warnings, torch
        from hmait.ops import masked_attention
        q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            out = masked_attention(q, k, v, (3, 4))
            masked_attention(q, k, v, (3, 4))
        ref = masked_attention(q, k, v, (3, 4), backend='torch')
        print('warnings', len(caught), str(caught[0].message) if caught else '')
        print('equal', torch.equal(out, ref))
        try:
            masked_attention(q, k, v, (3, 4), backend='cpu')
        except RuntimeError as err:
            print('cpu backend:', err)
    """)
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'HMAIT_EXTENSION_DIR': str(tmp_path / 'empty')}
    proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'warnings 1 hmait: the compiled CPU masked-attention kernel is unavailable (not built in' in proc.stdout
    assert 'make setup' in proc.stdout and 'equal True' in proc.stdout
    assert ("cpu backend: backend='cpu' (the call's backend argument (or its module's)) cannot run this call: "
            "the compiled CPU masked-attention kernel is unavailable (not built in") in proc.stdout
