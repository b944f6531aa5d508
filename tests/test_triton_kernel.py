"""The fused Triton kernels of the hard and strict masked heads against the dense reference.

Without a GPU the kernels run under triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set when the kernels are decorated, i.e. before ``hmait.ops.triton_masked`` is imported,
so this module imports it itself with the variable set (and restores the variable after).
"""
import importlib
import os

import pytest
import torch

from hmait.ops import dense_masked_attention, masked_attention

pytest.importorskip('triton')

_previous = os.environ.get('TRITON_INTERPRET')
os.environ['TRITON_INTERPRET'] = '1'
try:
    triton_masked = importlib.import_module('hmait.ops.triton_masked')
finally:
    if _previous is None:
        del os.environ['TRITON_INTERPRET']
    else:
        os.environ['TRITON_INTERPRET'] = _previous

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if isinstance(triton_masked._masked_fwd_kernel, InterpretedFunction):
    DEVICE = 'cpu'
elif torch.cuda.is_available():
    DEVICE = 'cuda'
else:
    pytest.skip('hmait.ops.triton_masked was imported before TRITON_INTERPRET=1 was set and there is no GPU',
                allow_module_level=True)

# (h, w, mask_size, prefix tokens, mode): square, non-square, 1 x W, grids smaller than the mask.
CASES = [
    (3, 4, 3, 0, 'hard'), (3, 4, 3, 1, 'hard'), (5, 5, 3, 0, 'hard'), (5, 5, 5, 2, 'hard'),
    (1, 6, 3, 1, 'hard'), (2, 2, 5, 0, 'hard'), (2, 2, 3, 1, 'hard'),
    (3, 4, 3, 0, 'strict'), (5, 5, 5, 1, 'strict'), (1, 6, 3, 0, 'strict'), (2, 2, 5, 2, 'strict'),
]


def _qkv(n: int, heads: int = 2, d: int = 8, dtype=torch.float32, seed: int = 0, std: float = 1.):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, heads, n, d, generator=gen) * std).to(DEVICE, dtype).requires_grad_()
            for _ in range(3)]


@pytest.mark.parametrize('h,w,mask_size,prefix,mode', CASES)
def test_kernel_matches_dense_reference(h, w, mask_size, prefix, mode):
    q, k, v = _qkv(prefix + h * w)
    out = masked_attention(q, k, v, (h, w), mask_size, mode, num_prefix_tokens=prefix, backend='triton')
    ref = dense_masked_attention(q, k, v, (h, w), mask_size, mode, num_prefix_tokens=prefix)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, g, r in zip('qkv', got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f'd{name}: {m}')


def test_kernel_reads_strided_head_slices():
    """The attention module passes head slices of one (B, N, 3, heads, d) projection, not copies."""
    h, w, prefix, heads, masked, d = 3, 3, 1, 3, 2, 8
    n = prefix + h * w
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, n, 3, heads, d, generator=gen).to(DEVICE).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = q[:, :masked], k[:, :masked], v[:, :masked]
    assert not q.is_contiguous()
    out = masked_attention(q, k, v, (h, w), 3, 'hard', num_prefix_tokens=prefix, backend='triton')
    (grad_kernel,) = torch.autograd.grad(out.square().sum(), qkv)
    ref = dense_masked_attention(q, k, v, (h, w), 3, 'hard', num_prefix_tokens=prefix)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_kernel, grad_ref, rtol=1e-5, atol=1e-5)
    # The global head's slice of the projection gets no gradient from the masked heads.
    assert grad_kernel[:, :, :, masked:].abs().max() == 0


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_half_precision_large_logits_stay_finite(dtype, mode):
    # Logits of magnitude ~1e4 overflow a half-precision softmax; the kernels accumulate in float32.
    h, w, prefix = 3, 4, 1
    q, k, v = _qkv(prefix + h * w, dtype=dtype, seed=2, std=40.)
    out = masked_attention(q, k, v, (h, w), 3, mode, num_prefix_tokens=prefix, backend='triton')
    assert out.dtype == dtype and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    for g, t in zip(grads, (q, k, v)):
        assert g.dtype == t.dtype and torch.isfinite(g).all()
    ref = dense_masked_attention(*(t.detach().float() for t in (q, k, v)), (h, w), 3, mode,
                                 num_prefix_tokens=prefix)
    # Only the inputs were rounded: the output agrees with float32 to half-precision accuracy.
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementation and autograd registration agree: torch.compile relies on them."""
    h, w, prefix = 2, 3, 1
    q, k, v = _qkv(prefix + h * w, seed=3)
    args = (q[:, :, prefix:].detach().requires_grad_(), k, v, h, w, prefix, 3, True, 8 ** -0.5)
    torch.library.opcheck(triton_masked._fwd_op, args,
                          test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))


def test_backend_argument_is_checked():
    q, k, v = _qkv(9)
    with pytest.raises(ValueError, match='backend must be one of'):
        masked_attention(q, k, v, (3, 3), backend='cuda')
    with pytest.raises(ValueError, match="modes 'hard' and 'strict'"):
        masked_attention(q, k, v, (3, 3), mode='soft', alpha=torch.full((2,), 0.5, device=DEVICE),
                         backend='triton')


def test_auto_backend_does_not_use_triton_on_cpu():
    """On CPU tensors 'auto' takes the compiled CPU kernel (tests/test_cpu_kernel.py), never Triton."""
    q, k, v = (t.detach().cpu() for t in _qkv(13))
    auto = masked_attention(q, k, v, (3, 4), num_prefix_tokens=1)
    assert torch.equal(auto, masked_attention(q, k, v, (3, 4), num_prefix_tokens=1, backend='cpu'))
    torch_path = masked_attention(q, k, v, (3, 4), num_prefix_tokens=1, backend='torch')
    torch.testing.assert_close(auto, torch_path, rtol=1e-5, atol=1e-5)


def test_triton_path_traces_into_one_graph():
    """torch.compile sees the kernels as opaque custom ops: forward and backward trace in one graph."""
    torch._dynamo.reset()
    q, k, v = _qkv(13, seed=4)

    def attention(q, k, v):
        return masked_attention(q, k, v, (3, 4), 3, 'hard', num_prefix_tokens=1, backend='triton')

    compiled = torch.compile(attention, fullgraph=True, backend='aot_eager')
    out = compiled(q, k, v)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    ref = dense_masked_attention(q, k, v, (3, 4), 3, 'hard', num_prefix_tokens=1)
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
