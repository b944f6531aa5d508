"""The global (unmasked) heads: ``softmax(q k^T * scale) v`` by torch's SDPA or by two matmuls.

On CPU, torch's ``scaled_dot_product_attention`` runs a flash kernel. For the short sequences of
H-MaiT's stages 3 and 4 (196 and 49 tokens at 224 px) it is slower than the plain formulation,
two batched matmuls and a softmax, most of all in the bf16 backward: measured with
``tools/analysis/benchmark_attention.py --paths sdpa-global global-matmul`` (see
docs/benchmarks.md). For long sequences flash is the faster one and keeps no ``(N, N)`` map, so
``backend='auto'`` takes the matmuls only up to a token count and a logits count per dtype
(larger when gradients are taken), on CPU, in eager mode.
Under ``torch.compile``, ``torch.export``, ONNX export and tracing it always takes SDPA, so that
the traced graph does not depend on the sequence length. Both paths are tested against the
unmasked dense reference (``dense_attention_map(..., mode=None) @ v``), gradients included.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .checks import exporting

GLOBAL_BACKENDS = ('auto', 'sdpa', 'matmul')

# Where 'auto' takes the matmuls on CPU: (most tokens, prefix tokens included; most logits,
# B * heads * N * N), for training (gradients needed) and for evaluation. The plain path keeps the
# whole (B, heads, N, N) map, so it loses once the map outgrows the caches as well as for long
# sequences; flash's backward is the slow part, so training gains over a wider range. Measured with
# tools/analysis/benchmark_attention.py on a 2-core AMD Zen 4 (docs/benchmarks.md); other CPUs
# may cross over elsewhere. Other dtypes (float16, float64) always take SDPA.
MATMUL_LIMITS = {
    torch.bfloat16: {'train': (256, 1 << 23), 'eval': (196, 1 << 22)},
    torch.float32: {'train': (144, 1 << 21), 'eval': (100, 1 << 20)},
}
# ... and only for heads of at most this size: H-MaiT's 32. At MaiT's 64 (196 tokens, 6 heads) the
# matmuls' forward took twice SDPA's time and the training pass was level.
MATMUL_MAX_HEAD_DIM = 32


def global_backend(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> str:
    """The backend ``'auto'`` picks for ``(B, heads, N, d)`` q (and k, v): ``'matmul'`` or ``'sdpa'``.

    Training limits apply when gradients will be taken, that is grad mode is on and one of the
    inputs requires them."""
    if (q.device.type != 'cpu' or exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return 'sdpa'
    limits = MATMUL_LIMITS.get(q.dtype)
    if limits is None or q.shape[-1] > MATMUL_MAX_HEAD_DIM:
        return 'sdpa'
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    max_tokens, max_logits = limits['train' if grad else 'eval']
    n, n_keys = q.shape[-2], q.shape[-2] if k is None else k.shape[-2]
    fits = max(n, n_keys) <= max_tokens and q.shape[:-2].numel() * n * n_keys <= max_logits
    return 'matmul' if fits else 'sdpa'


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as autocast would hand them to SDPA: floating point (float64 aside) in the autocast
    dtype when autocast is on for their device, unchanged otherwise."""
    device = tensors[0].device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     dropout_p: float = 0., backend: str = 'auto') -> torch.Tensor:
    """Unmasked attention of ``(B, heads, N, d)`` q, k, v -> ``(B, heads, N, d_v)``, in their dtype.

    ``dropout_p`` drops attention probabilities (pass 0 in evaluation, as with SDPA).
    ``backend``: ``'auto'`` (see :func:`global_backend`), ``'sdpa'`` or ``'matmul'``.
    Under autocast both backends compute in the autocast dtype, as SDPA does there.
    """
    if backend not in GLOBAL_BACKENDS:
        raise ValueError(f'backend must be one of {GLOBAL_BACKENDS}, got {backend!r}')
    q, k, v = _autocast_inputs(q, k, v)
    if backend == 'auto':
        backend = global_backend(q, k, v)
    if backend == 'sdpa':
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Autocast off: the dtypes below are chosen, not cast. Half-precision inputs get float32 logits
    # (bf16 rounds a logit near 1e3 to a multiple of 4) and a float32 softmax; the probabilities go
    # back to the input dtype for the matmul with v, as in flash attention. Scaling q (N x d) is
    # cheaper than scaling the N x N logits.
    device = q.device.type
    no_autocast = (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
                   else contextlib.nullcontext())
    with no_autocast:
        if q.dtype in (torch.float16, torch.bfloat16):
            logits = (q.float() * scale) @ k.float().transpose(-2, -1)
        else:
            logits = (q * scale) @ k.transpose(-2, -1)
        attn = logits.softmax(dim=-1).to(v.dtype)
        if dropout_p > 0.:
            attn = F.dropout(attn, dropout_p)
        return attn @ v
