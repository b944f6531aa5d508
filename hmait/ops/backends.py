"""Where each attention call runs, and why: the one place that picks the backends of the heads.

Two kinds of heads ask here: the masked heads (:func:`hmait.ops.masked_attention`, backends
:data:`MASKED_BACKENDS`) and the global heads (:func:`hmait.ops.global_attention`, backends
:data:`GLOBAL_BACKENDS`). The backend a call asks for is, first that is not ``'auto'``:

1. the call's ``backend`` argument (an attention module passes its own ``masked_backend`` /
   ``global_backend``);
2. the process's setting, made from Python with :func:`set_backend` or, within a block, :func:`use_backends`;
3. the environment variable of its kind (:data:`ENVIRONMENT`), read when the call is made, not at import;
4. ``'auto'``.

A named backend runs the call if its check passes and otherwise raises an error that gives the
check's reason. ``'auto'`` takes the fastest backend whose check passes, in a fixed order, and
:func:`choose_masked` / :func:`choose_global` return that choice with the reason for it. A choice
depends only on the call (device, dtype, shapes, whether gradients are taken, the mask mode), on the
process (exporting, compiling, whether the C++ kernel is built) and on these settings, so one machine
makes the same choice on every run, which keeps a resumed training bit-exact.

The logger ``hmait.ops.backends`` says at DEBUG level which backend each call site got and why: one
line the first time a site (kind of heads, shapes, dtype, device, gradients) is seen, and one
whenever its choice changes. Under ``torch.compile`` the choice is made while tracing, and a graph
keeps the choice it was traced with (the environment variables are not guarded; the Python setting is).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .checks import exporting

logger = logging.getLogger(__name__)

MASKED_BACKENDS = ('auto', 'torch', 'halo', 'triton', 'cpu', 'openvino')
GLOBAL_BACKENDS = ('auto', 'sdpa', 'matmul', 'cpu')
KINDS = {'masked': MASKED_BACKENDS, 'global': GLOBAL_BACKENDS}
ENVIRONMENT = {'masked': 'HMAIT_MASKED_ATTENTION_BACKEND', 'global': 'HMAIT_GLOBAL_ATTENTION_BACKEND'}

# How an export writes the hard and strict masked heads: 'halo' (standard ONNX operators, readable by
# every runtime; the default) or 'openvino' (one node hmait.MaskedAttention per layer, which OpenVINO
# runs with the project's CPU kernel once hmait.ops.openvino_extension is loaded). 'openvino-bf16' casts
# the node's input and output to bfloat16: OpenVINO runs custom nodes in the precision the graph gives
# them, so under its bf16 inference precision a float32 node costs two conversions per layer, while
# under f32 precision a bf16 node rounds its inputs. 'kernel' is for torch.export only: the C++ kernel's op
# hmait::masked_attention_cpu_qkv_fwd stays in the graph, which an AOTInductor package then calls through
# the dispatcher (its library loaded first); in a dynamic export the op takes the grid as symbolic sizes.
# Set with export_masked_heads(); read when traced.
EXPORT_FORMS = ('halo', 'openvino', 'openvino-bf16', 'kernel')
_EXPORT_FORM = contextvars.ContextVar('hmait_export_masked_heads', default='halo')

# What the compiled masked-head kernels (Triton on CUDA, C++ on CPU) read.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# The Triton kernels' largest head size (hmait.ops.triton_masked.MAX_HEAD_DIM, not imported: triton is optional).
TRITON_MAX_HEAD_DIM = 256

# Where 'auto' takes the global heads' matmuls on CPU when the C++ kernel does not run the call (a bias,
# dropout, another head size or dtype, or not built): (most tokens, prefix tokens included; most
# logits, B * heads * N * N), for training (gradients needed) and for evaluation. The plain path keeps
# the whole (B, heads, N, N) map, so it loses once the map outgrows the caches as well as for long
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
# The bfloat16 limits hold only where oneDNN multiplies bfloat16 natively (AVX-512 or AMX). On an
# AVX2 CPU torch's bfloat16 matmuls fall back to slow code: with oneDNN and ATen limited to AVX2 on
# that Zen 4, the matmuls took 9x SDPA's time in evaluation and 3x in training at 196 tokens, where
# SDPA's own kernels stayed fast. Fixed per machine, so a resumed run takes the same path.
@functools.cache
def _bf16_matmul_native() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_settings: dict[str, str | None] = {'masked': None, 'global': None}


class Choice(NamedTuple):
    """A backend and why it was chosen."""
    backend: str
    reason: str


def _check_kind(kind: str) -> tuple[str, ...]:
    if kind not in KINDS:
        raise ValueError(f'kind must be one of {tuple(KINDS)}, got {kind!r}')
    return KINDS[kind]


def check_backend(kind: str, name, argument: str = 'backend') -> str:
    """``name`` if it is a backend of ``kind`` ('masked' or 'global'), else a ValueError naming ``argument``."""
    allowed = _check_kind(kind)
    if name not in allowed:
        raise ValueError(f'{argument} must be one of {allowed}, got {name!r}')
    return name


def set_backend(kind: str, name: str | None) -> None:
    """Set the backend of ``kind`` ('masked' or 'global') for calls that ask for ``'auto'``, over the
    environment variable (``'auto'`` included); ``None`` undoes it."""
    if name is not None:
        check_backend(kind, name, f'the {kind} heads\' backend')
    _settings[kind] = name


@contextlib.contextmanager
def use_backends(masked: str | None = None, global_: str | None = None) -> Iterator[None]:
    """Within the block, calls that ask for ``'auto'`` use these backends (None: unchanged)."""
    previous = dict(_settings)
    try:
        for kind, name in (('masked', masked), ('global', global_)):
            if name is not None:
                set_backend(kind, name)
        yield
    finally:
        _settings.update(previous)


def requested_backend(kind: str, backend: str = 'auto') -> tuple[str, str]:
    """The backend a call with ``backend`` asks for, and where that came from (see the module's docstring)."""
    check_backend(kind, backend)
    if backend != 'auto':
        return backend, "the call's backend argument (or its module's)"
    setting = _settings[kind]
    if setting is not None:  # 'auto' set from Python overrides the environment too
        return setting, f'set with hmait.ops.backends.set_backend({kind!r}, ...)' if setting != 'auto' else ''
    variable = ENVIRONMENT[kind]
    value = os.environ.get(variable)
    if value:
        if value not in KINDS[kind]:
            raise ValueError(f'the environment variable {variable} must be one of {KINDS[kind]}, got {value!r}')
        if value != 'auto':
            return value, f'set by the environment variable {variable}'
    return 'auto', ''


@contextlib.contextmanager
def export_masked_heads(form: str) -> Iterator[None]:
    """Within the block, exports write the hard and strict masked heads in ``form`` (:data:`EXPORT_FORMS`)."""
    if form not in EXPORT_FORMS:
        raise ValueError(f'the export form of the masked heads must be one of {EXPORT_FORMS}, got {form!r}')
    if form == 'kernel':
        # Loaded here, before tracing starts: the build takes a lock that a tracer cannot follow.
        available, reason = cpu_kernel_status()
        if not available:
            raise RuntimeError(f"export form 'kernel': the compiled CPU kernel is unavailable: {reason}")
    token = _EXPORT_FORM.set(form)
    try:
        yield
    finally:
        _EXPORT_FORM.reset(token)


def export_form() -> str:
    """The form in which exports write the masked heads now (:func:`export_masked_heads`)."""
    return _EXPORT_FORM.get()


def cpu_kernel_status() -> tuple[bool, str]:
    """Whether the compiled CPU kernel can run here and, if not, why; builds nothing that was not built."""
    from . import cpu_kernel  # imported lazily: it may start a compiler

    status = cpu_kernel.decided_status()
    if status is not None:
        return status
    if torch.compiler.is_compiling():
        # Loading takes a lock torch.compile cannot trace: only a kernel loaded before tracing is used.
        return False, 'not loaded before torch.compile traced this call; call hmait.ops.cpu_kernel.build() first'
    if not cpu_kernel.is_built():
        return False, (f'not built in {cpu_kernel.extension_dir()}; build it with `make setup` or '
                       '`python -c "from hmait.ops import cpu_kernel; cpu_kernel.build(verbose=True)"`')
    return cpu_kernel.cpu_kernel_status()


# ----------------------------------------------------------------------------------------------------
# The masked heads


def _hard_or_strict(mode: str) -> str | None:
    if mode == 'soft':
        return "it implements modes 'hard' and 'strict'; mode 'soft' runs on backend 'auto' or 'torch'"
    return None


def _check_halo(q: torch.Tensor, v_dim: int, mode: str) -> str | None:
    return _hard_or_strict(mode)


def _check_cpu(q: torch.Tensor, v_dim: int, mode: str) -> str | None:
    reason = _hard_or_strict(mode)
    if reason is None and q.device.type != 'cpu':
        reason = f'the compiled CPU kernel takes CPU tensors, got a tensor on {q.device}'
    if reason is None and q.dtype not in KERNEL_DTYPES:
        reason = f'the compiled CPU kernel takes {KERNEL_DTYPES}, got {q.dtype}'
    if reason is None:
        available, why = cpu_kernel_status()
        if not available:
            reason = f'the compiled CPU masked-attention kernel is unavailable ({why})'
    return reason


_TRITON_INSTALLED = None


def _check_triton(q: torch.Tensor, v_dim: int, mode: str) -> str | None:
    global _TRITON_INSTALLED
    reason = _hard_or_strict(mode)
    if reason is None:
        if _TRITON_INSTALLED is None:  # checked without importing triton, so CPU-only users never load it
            _TRITON_INSTALLED = importlib.util.find_spec('triton') is not None
        if not _TRITON_INSTALLED:
            reason = 'triton is not installed'
        elif max(q.shape[-1], v_dim) > TRITON_MAX_HEAD_DIM:
            reason = f'the Triton kernels take head sizes up to {TRITON_MAX_HEAD_DIM}, got {max(q.shape[-1], v_dim)}'
    return reason


def _check_openvino(q: torch.Tensor, v_dim: int, mode: str) -> str | None:
    reason = _hard_or_strict(mode)
    if reason is None and not exporting():
        reason = ("it writes an OpenVINO node into an export and runs only while torch.onnx.export traces; "
                  "in PyTorch use backend 'auto'")
    if reason is None and v_dim != q.shape[-1]:
        reason = (f'the OpenVINO node takes a packed qkv of one head size; got head sizes {q.shape[-1]} (q, k) '
                  f"and {v_dim} (v): export these heads with masked_heads='halo'")
    return reason


# Each backend's check: None when it can run the call, else why not.
MASKED_CHECKS = {
    'torch': lambda q, v_dim, mode: None,
    'halo': _check_halo,
    'cpu': _check_cpu,
    'triton': _check_triton,
    'openvino': _check_openvino,
}

_warned_cpu_fallback = False


def _auto_masked(q: torch.Tensor, v_dim: int, mode: str) -> Choice:
    if exporting():
        # By default ONNX and torch.export graphs hold standard operators only, which every runtime
        # knows: the halo form's batched MatMuls rather than the shifted slices of the 'torch' path.
        form = export_form()
        if mode == 'soft':
            return Choice('torch', 'exporting mode soft: its chunked dense attention')
        if form == 'halo':
            return Choice('halo', "exporting: the export form 'halo', standard operators")
        backend = 'cpu' if form == 'kernel' else 'openvino'
        reason = MASKED_CHECKS[backend](q, v_dim, mode)
        if reason is not None:
            raise ValueError(f'export form {form!r}: {reason}')
        return Choice(backend, f'exporting: the export form {form!r}')
    if mode == 'soft':
        return Choice('torch', 'mode soft keeps every logit: only the PyTorch path computes it')
    if q.dtype not in KERNEL_DTYPES:
        return Choice('torch', f'no compiled kernel takes {q.dtype}')
    if q.is_cuda:
        if q.dtype == torch.float64:
            return Choice('torch', 'the Triton kernels take no float64')
        reason = _check_triton(q, v_dim, mode)
        return Choice('torch', reason) if reason else Choice('triton', 'a CUDA tensor: the fused Triton kernels')
    if q.device.type != 'cpu':
        return Choice('torch', f'no compiled kernel for {q.device.type} tensors')
    reason = _check_cpu(q, v_dim, mode)
    if reason is None:
        from . import cpu_kernel
        return Choice('cpu', f'a CPU tensor: the compiled C++ kernel ({cpu_kernel.decided_status()[1]})')
    global _warned_cpu_fallback
    if not _warned_cpu_fallback and not torch.compiler.is_compiling():
        _warned_cpu_fallback = True
        warnings.warn(f'hmait: {reason}; masked heads run on the slower PyTorch path', RuntimeWarning, stacklevel=5)
    return Choice('torch', reason)


def choose_masked(q: torch.Tensor, v_dim: int, mode: str, backend: str = 'auto') -> Choice:
    """The backend of a masked-head call on ``(B, heads, N, d)`` q and values of size ``v_dim``, and why.

    ``backend`` is the call's request (:data:`MASKED_BACKENDS`); a named backend that cannot run the
    call raises ValueError (RuntimeError for an unavailable CPU kernel) with its check's reason."""
    name, source = requested_backend('masked', backend)
    if name == 'auto':
        choice = _auto_masked(q, v_dim, mode)
    else:
        reason = MASKED_CHECKS[name](q, v_dim, mode)
        if reason is not None:
            unavailable = reason.startswith('the compiled CPU masked-attention kernel is unavailable')
            error = RuntimeError if unavailable else ValueError
            raise error(f'backend={name!r} ({source}) cannot run this call: {reason}')
        choice = Choice(name, source)
    _log('masked', q, v_dim, choice)
    return choice


# ----------------------------------------------------------------------------------------------------
# The global heads


def _check_global_cpu(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, bias: bool,
                      dropout_p: float) -> str | None:
    """Why the C++ kernel of the global heads (hmait::global_attention_cpu_fwd / _bwd) cannot run this call,
    or None."""
    from .cpu_kernel import GLOBAL_DTYPES, GLOBAL_HEAD_DIMS

    if q.device.type != 'cpu':
        return f'the compiled CPU kernel takes CPU tensors, got a tensor on {q.device}'
    if q.dtype not in GLOBAL_DTYPES:
        return f'the compiled CPU kernel of the global heads takes {GLOBAL_DTYPES}, got {q.dtype}'
    dims = {q.shape[-1], *(t.shape[-1] for t in (k, v) if t is not None)}
    if len(dims) != 1 or q.shape[-1] not in GLOBAL_HEAD_DIMS:
        return f'the compiled CPU kernel of the global heads takes head sizes {GLOBAL_HEAD_DIMS} (q, k and v alike), ' \
               f'got {sorted(dims)}'
    if bias:
        return 'the compiled CPU kernel of the global heads takes no additive bias (a window with padded keys)'
    if dropout_p > 0.:
        return 'the compiled CPU kernel of the global heads applies no dropout'
    if exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return 'traced: the compiled CPU kernel of the global heads runs in eager mode only'
    available, why = cpu_kernel_status()
    if not available:
        return f'the compiled CPU kernel is unavailable ({why})'
    return None


def _auto_global(q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, bias: bool,
                 dropout_p: float) -> Choice:
    if q.device.type != 'cpu':
        return Choice('sdpa', f'a {q.device.type} tensor: the matmul limits are for CPUs')
    if exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return Choice('sdpa', 'traced: a graph that does not depend on the sequence length')
    # The C++ kernel wherever it runs (docs/benchmarks.md): in evaluation faster than the matmuls and SDPA at
    # every shape measured, from 49 to 4,200 keys; in training level with the matmuls in bf16 and faster in
    # fp32; like flash attention it keeps no logits map.
    reason = _check_global_cpu(q, k, v, bias, dropout_p)
    if reason is None:
        return Choice('cpu', 'on CPU: the compiled C++ kernel of the global heads')
    limits = MATMUL_LIMITS.get(q.dtype)
    if limits is None:
        return Choice('sdpa', f'no matmul limits for {q.dtype}')
    if q.dtype == torch.bfloat16 and not _bf16_matmul_native():
        return Choice('sdpa', "this CPU has no native bfloat16 matmuls (oneDNN's bf16 support: AVX-512 or AMX)")
    if q.shape[-1] > MATMUL_MAX_HEAD_DIM:
        return Choice('sdpa', f'head size {q.shape[-1]} > {MATMUL_MAX_HEAD_DIM}')
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    phase = 'train' if grad else 'eval'
    max_tokens, max_logits = limits[phase]
    n, n_keys = q.shape[-2], q.shape[-2] if k is None else k.shape[-2]
    logits = q.shape[:-2].numel() * n * n_keys
    within = f'{max(n, n_keys)} tokens (limit {max_tokens}), {logits} logits (limit {max_logits})'
    limits_name = f'{str(q.dtype).removeprefix("torch.")} {"training" if grad else "evaluation"}'
    if max(n, n_keys) <= max_tokens and logits <= max_logits:
        return Choice('matmul', f'{limits_name}: {within}')
    return Choice('sdpa', f'{limits_name}: beyond the matmul limits, {within}')


def choose_global(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                  backend: str = 'auto', bias: bool = False, dropout_p: float = 0.) -> Choice:
    """The backend of a global-head call on ``(B, heads, N, d)`` q, k, v (in the dtype they compute in), and why.

    ``bias``: whether the call adds a bias to the logits; ``dropout_p``: its dropout.
    'sdpa' and 'matmul' run every call; 'cpu' (the compiled C++ kernel) runs CPU calls without bias or
    dropout at head sizes 32 and 64 in eager mode, and raises ValueError (RuntimeError where the kernel is
    not built) with the reason otherwise. ``'auto'`` takes 'cpu' where it runs, else the matmuls on CPU in
    eager mode within :data:`MATMUL_LIMITS` (training limits when gradients will be taken), else SDPA."""
    name, source = requested_backend('global', backend)
    if name == 'auto':
        choice = _auto_global(q, k, v, bias, dropout_p)
    else:
        reason = _check_global_cpu(q, k, v, bias, dropout_p) if name == 'cpu' else None
        if reason is not None:
            error = RuntimeError if reason.startswith('the compiled CPU kernel is unavailable') else ValueError
            raise error(f'backend={name!r} ({source}) cannot run this call: {reason}')
        choice = Choice(name, source)
    _log('global', q, None if v is None else v.shape[-1], choice)
    return choice


# ----------------------------------------------------------------------------------------------------
# The debug log

_last_choice: dict[tuple, Choice] = {}


def _log(kind: str, q: torch.Tensor, v_dim: int | None, choice: Choice) -> None:
    if torch.compiler.is_compiling() or not logger.isEnabledFor(logging.DEBUG):
        return
    grad = torch.is_grad_enabled() and q.requires_grad
    site = (kind, tuple(q.shape), v_dim, q.dtype, q.device.type, grad)
    if _last_choice.get(site) == choice:
        return
    _last_choice[site] = choice
    b, heads, n, d = q.shape
    logger.debug('%s heads, batch %d, %d heads of %d, %d tokens, %s on %s%s: %s (%s)', kind, b, heads, d, n,
                 str(q.dtype).removeprefix('torch.'), q.device.type, ', with gradients' if grad else '',
                 choice.backend, choice.reason)
