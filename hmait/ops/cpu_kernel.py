"""Compiled CPU kernels for the hard and strict masked heads, forward and backward.

The C++ sources in ``hmait/ops/csrc`` are built on first use (or by an explicit :func:`build`, which
the set-up script can run) with ``torch.utils.cpp_extension.load`` into a cache folder:
``$HMAIT_EXTENSION_DIR`` if set, else ``~/.cache/hmait/extensions/torch-<version>-py<major><minor>``.
Later processes reuse the built library. ``import hmait`` never imports this module, so importing
the package never needs a compiler.

The kernels register torch custom ops, opaque to ``torch.compile``:

* ``hmait::masked_attention_cpu_fwd(q, k, v, h, w, num_prefix, mask_size, hard, scale) -> (out, lse)``
* ``hmait::masked_attention_cpu_bwd(grad_out, q, k, v, out, lse, h, w, num_prefix, mask_size, hard,
  scale) -> (grad_q, grad_k, grad_v)``
* ``hmait::masked_attention_cpu_qkv_fwd(qkv, h, w, num_prefix, mask_size, hard, scale) -> (out, lse)`` and
  ``hmait::masked_attention_cpu_qkv_bwd(grad_out, qkv, out, lse, ...) -> grad_qkv``: the same on the
  packed ``(B, N, 3, heads, d)`` projection, whose gradient the kernel writes in one piece (separate
  q, k, v views would have autograd stack three gradients into it, a full copy).

* ``hmait::global_attention_cpu_fwd(q, k, v, scale) -> (out, lse)`` and
  ``hmait::global_attention_cpu_bwd(grad_out, q, k, v, out, lse, scale) -> (grad_q, grad_k, grad_v)``: the
  global heads (no mask) in the same layout, q ``(B, Nq, heads, d)``, k and v ``(B, Nk, heads, d)``, head
  sizes 32 and 64, float32 / bfloat16 / float16 (:func:`global_attention_cpu`).

Layout contract: q, k ``(B, N, heads, d)`` and v ``(B, N, heads, d_v)`` with any strides (the channel
dimension should be contiguous, else it is copied), e.g. views of the qkv projection output reshaped
to ``(B, N, 3, heads, d)``. ``out`` is a new contiguous ``(B, N, heads, d_v)`` tensor, so
``out.view(B, N, heads * d_v)`` is the input of the output projection without a copy. ``lse`` is
``(B, heads, N)`` in float32 (float64 for float64 inputs). All arithmetic is in float32 (float64 for
float64) whatever the input dtype; q, k, v are read in their own dtype. Semantics are exactly those
of :func:`hmait.ops.masked_attention` for modes 'hard' and 'strict', prefix queries included.

:func:`masked_attention_bnhd` (token-major layout), :func:`masked_attention_qkv_cpu` (packed) and
:func:`masked_attention_cpu` (the ``(B, heads, N, d)`` layout of :func:`hmait.ops.masked_attention`)
are differentiable wrappers.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from .checks import check_grid, check_int, check_mask_size, check_packed_qkv

__all__ = ['build', 'cpu_kernel_status', 'decided_status', 'extension_dir', 'is_available', 'is_built', 'kernel_isa',
           'global_attention_cpu', 'library_path',
           'masked_attention_bnhd', 'masked_attention_cpu', 'masked_attention_qkv_cpu']

_EXTENSION_NAME = 'hmait_masked_attention_cpu'
_CSRC = Path(__file__).resolve().parent / 'csrc'
# The torch-free kernel sources, shared with the OpenVINO extension (hmait.ops.openvino_extension), and the
# torch op layer around them.
KERNEL_SOURCES = ('masked_attention_cpu_isa.cpp', 'masked_attention_cpu_default.cpp', 'masked_attention_cpu_avx2.cpp',
                  'masked_attention_cpu_avx512.cpp', 'masked_attention_cpu_avx512_bf16.cpp')
_SOURCES = ('masked_attention_cpu.cpp', *KERNEL_SOURCES)
KERNEL_HEADERS = ('masked_attention_cpu_kernel.h', 'masked_attention_cpu_kernel_impl.h')
# No -march flags: the AVX2 and AVX-512 variants are enabled per function in their own sources and
# chosen at run time from the CPU, so the library runs on any x86-64 (and builds elsewhere).
_CFLAGS = ('-O3', '-fopenmp', '-ffp-contract=fast')
_LDFLAGS = ('-fopenmp',)
_MODES = ('hard', 'strict')

_lock = threading.Lock()
_status: tuple[bool, str] | None = None


def extension_dir() -> Path:
    """Folder of the built library: ``$HMAIT_EXTENSION_DIR``, else a per-torch-version user cache."""
    configured = os.environ.get('HMAIT_EXTENSION_DIR')
    if configured:
        return Path(configured).expanduser()
    version = torch.__version__.replace('+', '_')
    python = f'py{sys.version_info[0]}{sys.version_info[1]}'
    return Path.home() / '.cache' / 'hmait' / 'extensions' / f'torch-{version}-{python}'


def cpp_extension():
    """``torch.utils.cpp_extension``, imported without the warning it logs on a machine without CUDA
    ("No CUDA runtime is found, using CUDA_HOME=..."): the CPU kernel needs no CUDA, and every tool
    that loads the kernel would print it."""
    logger = logging.getLogger('torch.utils.cpp_extension')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension as module
    finally:
        logger.setLevel(level)
    return module


def _missing_prerequisite() -> str | None:
    """Why a build cannot even start, checked before handing over to cpp_extension."""
    missing = [name for name in _SOURCES + KERNEL_HEADERS if not (_CSRC / name).is_file()]
    if missing:
        return f'the kernel sources are not installed: {", ".join(missing)} missing from {_CSRC}'
    if sys.platform == 'win32':
        return 'the CPU kernel is built with GCC or Clang; Windows builds are not supported'
    compiler = os.environ.get('CXX', 'c++')
    if shutil.which(compiler) is None:
        source = 'the CXX environment variable' if 'CXX' in os.environ else 'the default'
        return f'no C++ compiler: {compiler!r} (from {source}) was not found'
    try:
        cpp_extension().verify_ninja_availability()
    except RuntimeError as err:
        return f'ninja is needed to build the kernel and was not found ({err}); pip install ninja'
    return None


def _summarise_build_error(err: BaseException) -> str:
    text = str(err).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if 'error' in line.lower()]
    detail = ' | '.join((errors or lines)[-6:])
    return f'building the extension failed ({type(err).__name__}): {detail[-1500:]}'


def _register_python_parts() -> None:
    """Fake (meta) kernels for torch.compile and the autograd formula of the forward op."""
    torch.library.register_fake('hmait::masked_attention_cpu_fwd', _fwd_fake)
    torch.library.register_fake('hmait::masked_attention_cpu_bwd', _bwd_fake)
    torch.library.register_autograd('hmait::masked_attention_cpu_fwd', _backward_of('masked_attention_cpu_bwd', 9),
                                    setup_context=_setup_context)
    torch.library.register_fake('hmait::masked_attention_cpu_qkv_fwd', _qkv_fwd_fake)
    torch.library.register_fake('hmait::masked_attention_cpu_qkv_bwd', _qkv_bwd_fake)
    torch.library.register_autograd('hmait::masked_attention_cpu_qkv_fwd', _qkv_backward,
                                    setup_context=_qkv_setup_context)
    torch.library.register_fake('hmait::global_attention_cpu_fwd', _global_fwd_fake)
    torch.library.register_fake('hmait::global_attention_cpu_bwd', _global_bwd_fake)
    torch.library.register_autograd('hmait::global_attention_cpu_fwd', _backward_of('global_attention_cpu_bwd', 4),
                                    setup_context=_setup_context)


def _load(verbose: bool) -> tuple[bool, str]:
    reason = _missing_prerequisite()
    if reason is not None:
        return False, reason
    build_dir = extension_dir()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension().load(name=_EXTENSION_NAME, sources=[str(_CSRC / name) for name in _SOURCES],
                           extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS),
                           extra_include_paths=[str(_CSRC)], build_directory=str(build_dir),
                           is_python_module=False, verbose=verbose)
    except (Exception, SystemExit) as err:  # cpp_extension reports failures as several exception types
        return False, _summarise_build_error(err)
    if not hasattr(torch.ops.hmait, 'masked_attention_cpu_fwd'):
        return False, f'the extension in {build_dir} loaded but did not register hmait::masked_attention_cpu_fwd'
    _register_python_parts()
    return True, f'built in {build_dir}, instruction set {torch.ops.hmait.masked_attention_cpu_isa("")}'


def build(verbose: bool = False) -> bool:
    """Build (or load the cached build of) the kernel; safe to call from several threads and processes.

    Returns whether the kernel is usable; :func:`cpu_kernel_status` says why not. The outcome,
    success or failure, is remembered for the process.
    """
    global _status
    # Lock-free once decided, which also lets torch.compile trace through the wrappers below.
    if _status is None:
        with _lock:
            if _status is None:
                _status = _load(verbose)
    return _status[0]


def cpu_kernel_status() -> tuple[bool, str]:
    """``(available, reason)``: builds on first call, then reports the remembered outcome."""
    build()
    return _status


def decided_status() -> tuple[bool, str] | None:
    """The outcome of the build if one was attempted in this process, else None; never builds.

    For callers that must not start a build, e.g. a dispatcher running under ``torch.compile``
    tracing, where taking the build lock is not traceable.
    """
    return _status


def library_path() -> Path:
    """The built library's file (what a C++ program loads before an AOTInductor package that calls the
    kernel's ops); never builds."""
    return extension_dir() / f'{_EXTENSION_NAME}.so'


def is_built() -> bool:
    """Whether a built library is in :func:`extension_dir` (it may still be rebuilt on loading if the
    sources changed since); never builds."""
    return library_path().is_file()


def is_available() -> bool:
    """Whether the kernel is built and loaded (building it on first call)."""
    return build()


def kernel_isa(requested: str = '') -> str:
    """The instruction-set variant in use ('default', 'avx2', 'avx512', 'avx512_bf16': AVX-512 with the
    bfloat16 dot product, which only bfloat16 inputs use); ``requested`` selects one
    ('best' restores the automatic choice). The automatic choice honours ``ATEN_CPU_CAPABILITY``."""
    _require()
    return torch.ops.hmait.masked_attention_cpu_isa(requested)


def _require() -> None:
    if not build():
        raise RuntimeError(f'the hmait CPU masked-attention kernel is unavailable: {_status[1]}')


# ---- autograd and fake kernels ----

def _fwd_fake(q, k, v, h, w, num_prefix, mask_size, hard, scale):
    b, n, heads, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(b, n, heads, v.shape[-1]), q.new_empty(b, heads, n, dtype=acc)


def _global_fwd_fake(q, k, v, scale):
    b, n, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty(b, heads, n, dtype=torch.float32)


def _global_bwd_fake(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _gradient_like(t):
    """The kernel's gradient layout: like t where t is dense with contiguous channels, else contiguous."""
    g = torch.empty_like(t)
    return g if g.shape[-1] <= 1 or g.stride(-1) == 1 else t.new_empty(t.shape)


def _bwd_fake(grad_out, q, k, v, out, lse, h, w, num_prefix, mask_size, hard, scale):
    return _gradient_like(q), _gradient_like(k), _gradient_like(v)


def _qkv_fwd_fake(qkv, h, w, num_prefix, mask_size, hard, scale):
    return _fwd_fake(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], h, w, num_prefix, mask_size, hard, scale)


def _qkv_bwd_fake(grad_out, qkv, out, lse, h, w, num_prefix, mask_size, hard, scale):
    return qkv.new_empty(qkv.shape)


def _save(ctx, tensors, config, output):
    out, lse = output
    ctx.save_for_backward(*tensors, out, lse)
    ctx.config = config
    ctx.mark_non_differentiable(lse)
    # lse never gets a gradient: without this, autograd would fill a zero tensor for it every backward.
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs[:3], inputs[3:], output)


def _backward_of(op_name: str, num_inputs: int):
    """The autograd formula of a forward op ``(q, k, v, *config) -> (out, lse)`` whose backward op is
    ``hmait::<op_name>(grad_out, q, k, v, out, lse, *config) -> (grad_q, grad_k, grad_v)``."""
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return (None,) * num_inputs
        q, k, v, out, lse = ctx.saved_tensors
        grads = getattr(torch.ops.hmait, op_name)(grad_out, q, k, v, out, lse, *ctx.config)
        return (*grads, *(None,) * (num_inputs - 3))
    return backward


def _qkv_setup_context(ctx, inputs, output):
    _save(ctx, inputs[:1], inputs[1:], output)


def _qkv_backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        return (None,) * 7
    qkv, out, lse = ctx.saved_tensors
    grad_qkv = torch.ops.hmait.masked_attention_cpu_qkv_bwd(grad_out, qkv, out, lse, *ctx.config)
    return grad_qkv, None, None, None, None, None, None


# ---- wrappers ----

def _check_call(q: torch.Tensor, hw, mask_size: int, mode: str, num_prefix_tokens: int) -> tuple[int, int]:
    if mode not in _MODES:
        raise ValueError(f'the CPU kernel implements mode {_MODES}, got {mode!r}')
    check_mask_size(mask_size)
    check_int('num_prefix_tokens', num_prefix_tokens, minimum=0)
    return check_grid(hw)


def masked_attention_bnhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw, mask_size: int = 3,
                          mode: str = 'hard', num_prefix_tokens: int = 0, scale: float | None = None) -> torch.Tensor:
    """Masked attention in the token-major layout, differentiable in q, k and v.

    Args:
        q, k: ``(B, N, heads, d)``; v: ``(B, N, heads, d_v)``; any strides, e.g. views of
            ``qkv.reshape(B, N, 3, heads, d)``. ``N = num_prefix_tokens + h*w``.
        mode: 'hard' or 'strict'. scale: logit scale, ``1/sqrt(d)`` by default.

    Returns:
        A new contiguous ``(B, N, heads, d_v)`` tensor in the dtype of q.
    """
    h, w = _check_call(q, hw, mask_size, mode, num_prefix_tokens)
    _require()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.hmait.masked_attention_cpu_fwd(q, k, v, h, w, num_prefix_tokens, mask_size, mode == 'hard',
                                                      scale)
    return out


def masked_attention_qkv_cpu(qkv: torch.Tensor, hw, mask_size: int = 3, mode: str = 'hard',
                             num_prefix_tokens: int = 0, scale: float | None = None) -> torch.Tensor:
    """:func:`masked_attention_bnhd` on the packed projection, differentiable in qkv.

    qkv ``(B, N, 3, heads, d)``, e.g. ``qkv_linear(x).reshape(B, N, 3, heads, d)`` or a head slice of
    it, -> a new contiguous ``(B, N, heads, d)`` tensor. Its backward writes the gradient of qkv in one
    piece, where separate q, k, v would have their three gradients stacked into it afterwards.
    """
    h, w = _check_call(check_packed_qkv(qkv), hw, mask_size, mode, num_prefix_tokens)
    _require()
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.hmait.masked_attention_cpu_qkv_fwd(qkv, h, w, num_prefix_tokens, mask_size, mode == 'hard',
                                                          scale)
    return out


def masked_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw, mask_size: int = 3,
                         mode: str = 'hard', num_prefix_tokens: int = 0, scale: float | None = None) -> torch.Tensor:
    """:func:`hmait.ops.masked_attention` for modes 'hard' and 'strict' through the CPU kernel.

    q, k ``(B, heads, N, d)``, v ``(B, heads, N, d_v)`` -> ``(B, heads, N, d_v)``. The inputs are
    passed to the kernel as transposed views and the result is a transposed view of the kernel's
    token-major output, so ``out.transpose(1, 2).reshape(B, N, heads * d_v)`` copies nothing.
    """
    out = masked_attention_bnhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), hw, mask_size, mode,
                                num_prefix_tokens, scale)
    return out.transpose(1, 2)


# The dtypes and head sizes of the global heads' kernel (hmait::global_attention_cpu_fwd / _bwd; the op
# layer's check_global_inputs refuses the others).
GLOBAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GLOBAL_HEAD_DIMS = (32, 64)


def global_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``softmax(scale q k^T) v`` of ``(B, heads, N, d)`` q and ``(B, heads, N_k, d)`` k, v through the C++
    kernel, differentiable in q, k and v: float32 logits and softmax, the output in the inputs' dtype (a
    transposed view of a new token-major tensor, as :func:`masked_attention_cpu` returns). The backward
    recomputes the probabilities from the saved log-sum-exp, in float32. Head sizes 32 and 64; float32,
    bfloat16 and float16.
    """
    _require()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out, _ = torch.ops.hmait.global_attention_cpu_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      scale)
    return out.transpose(1, 2)
