"""The global (unmasked) heads: ``softmax(q k^T * scale) v`` by torch's SDPA or by two matmuls.

On CPU, torch's ``scaled_dot_product_attention`` runs a flash kernel. For the short sequences of
H-MaiT's stages 3 and 4 (196 and 49 tokens at 224 px) it is slower than the plain formulation,
two batched matmuls and a softmax, most of all in the bf16 backward: measured with
``tools/analysis/benchmark_attention.py --paths sdpa-global global-matmul`` (see
docs/benchmarks.md). For long sequences flash is the faster one and keeps no ``(N, N)`` map, so
``backend='auto'`` takes the matmuls only up to a per-dtype token count, on CPU, in eager mode.
Under ``torch.compile``, ``torch.export``, ONNX export and tracing it always takes SDPA, so that
the traced graph does not depend on the sequence length. Both paths are tested against the
unmasked dense reference (``dense_attention_map(..., mode=None) @ v``), gradients included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import exporting

GLOBAL_BACKENDS = ('auto', 'sdpa', 'matmul')

# The longest sequence (tokens, prefix tokens included) for which 'auto' takes the matmuls on CPU.
# Other dtypes (float16, float64) always take SDPA.
MATMUL_MAX_TOKENS = {torch.bfloat16: 400, torch.float32: 100}


def global_backend(q: torch.Tensor) -> str:
    """The backend ``'auto'`` picks for ``q`` of shape ``(B, heads, N, d)``: ``'matmul'`` or ``'sdpa'``."""
    if (q.device.type != 'cpu' or exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return 'sdpa'
    limit = MATMUL_MAX_TOKENS.get(q.dtype)
    return 'matmul' if limit is not None and q.shape[-2] <= limit else 'sdpa'


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     dropout_p: float = 0., backend: str = 'auto') -> torch.Tensor:
    """Unmasked attention of ``(B, heads, N, d)`` q, k, v -> ``(B, heads, N, d_v)``, in their dtype.

    ``dropout_p`` drops attention probabilities (pass 0 in evaluation, as with SDPA).
    ``backend``: ``'auto'`` (see :func:`global_backend`), ``'sdpa'`` or ``'matmul'``.
    """
    if backend not in GLOBAL_BACKENDS:
        raise ValueError(f'backend must be one of {GLOBAL_BACKENDS}, got {backend!r}')
    if backend == 'auto':
        backend = global_backend(q)
    if backend == 'sdpa':
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Autocast off: the dtypes below are chosen, not cast. Half-precision inputs get float32 logits
    # (a bf16 logit of magnitude 1e3 is off by up to 4) and a float32 softmax; the probabilities go
    # back to the input dtype for the matmul with v, as in flash attention. Scaling q (N x d) is
    # cheaper than scaling the N x N logits.
    with torch.autocast(q.device.type, enabled=False):
        if q.dtype in (torch.float16, torch.bfloat16):
            logits = (q.float() * scale) @ k.float().transpose(-2, -1)
        else:
            logits = (q * scale) @ k.transpose(-2, -1)
        attn = logits.softmax(dim=-1).to(v.dtype)
        if dropout_p > 0.:
            attn = F.dropout(attn, dropout_p)
        return attn @ v
