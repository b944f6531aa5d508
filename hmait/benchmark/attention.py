"""Time and peak memory of the masked-attention paths against the dense reference and global SDPA.

Layouts: ``heads`` gives every path separate q, k, v of shape ``(B, heads, N, d)`` (the layout of
:func:`hmait.ops.masked_attention`); ``packed`` gives it one ``(B, N, 3, heads, d)`` tensor, as a
model's qkv projection leaves it, through :func:`hmait.ops.masked_attention_qkv`, and the output and
gradient are those the model sees. Paths (on a ``side x side`` grid):

* ``hard``, ``strict``, ``soft``: :func:`hmait.ops.masked_attention` as a model calls it
  (``backend='auto'``: the fastest path available on the device);
* ``hard-torch``, ``strict-torch``: the portable PyTorch path (``backend='torch'``), the baseline
  every compiled kernel is compared with;
* ``dense-hard``: the O(N^2) reference :func:`hmait.ops.dense_masked_attention`;
* ``sdpa-global``: ``scaled_dot_product_attention`` over all tokens, what a global head costs;
* ``global-matmul``: the same by two matmuls and a softmax (:func:`hmait.ops.global_attention` with
  ``backend='matmul'``), which the global heads take on CPU for short sequences where the kernel below
  does not run;
* ``global-cpu``: the same by the C++ kernel (``backend='cpu'``), which they take on CPU.

Paths are timed alternately and peak memory is that of one call, both with
:mod:`hmait.benchmark.measure`. Quadratic paths are skipped above a token limit.
``kernel_isas`` times ``hard`` and ``strict`` once per instruction-set variant of the CPU kernel
(:func:`hmait.ops.cpu_kernel.kernel_isa`), alternately, as paths ``hard@avx512`` and so on.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..ops import dense_masked_attention, global_attention, masked_attention, masked_attention_qkv
from ..ops.masked_attention import qkv_heads
from .measure import markdown_table, peak_memory_mib, time_alternating

PATHS = ('hard', 'strict', 'soft', 'hard-torch', 'strict-torch', 'dense-hard', 'sdpa-global', 'global-matmul',
         'global-cpu')
QUADRATIC = ('soft', 'dense-hard', 'sdpa-global', 'global-matmul', 'global-cpu')
LAYOUTS = ('heads', 'packed')


def path_fn(path: str, hw: tuple[int, int], mask_size: int, layout: str = 'heads') -> Callable:
    """``fn(q, k, v, alpha) -> out`` for one path; for layout 'packed', ``fn(qkv, alpha) -> out``
    in the token-major ``(B, N, heads, d)`` layout."""
    if path not in PATHS:
        raise ValueError(f'path must be one of {PATHS}, got {path!r}')
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')

    def packed(qkv, alpha):
        if path in ('hard', 'strict', 'soft'):
            return masked_attention_qkv(qkv, hw, mask_size, path, alpha)
        if path in ('hard-torch', 'strict-torch'):
            return masked_attention_qkv(qkv, hw, mask_size, path.split('-')[0], backend='torch')
        return fn(*qkv_heads(qkv), alpha).transpose(1, 2)

    def fn(q, k, v, alpha):
        if path in ('hard', 'strict', 'soft'):
            return masked_attention(q, k, v, hw, mask_size, path, alpha)
        if path in ('hard-torch', 'strict-torch'):
            return masked_attention(q, k, v, hw, mask_size, path.split('-')[0], backend='torch')
        if path == 'dense-hard':
            return dense_masked_attention(q, k, v, hw, mask_size, 'hard')
        if path == 'global-matmul':
            return global_attention(q, k, v, backend='matmul')
        if path == 'global-cpu':
            return global_attention(q, k, v, backend='cpu')
        return F.scaled_dot_product_attention(q, k, v)
    return packed if layout == 'packed' else fn


KERNEL_PATHS = ('hard', 'strict')


def _with_kernel_isa(run: Callable[[], None], isa: str) -> Callable[[], None]:
    """``run`` with the CPU kernel's instruction-set variant ``isa`` selected for the call."""
    from ..ops.cpu_kernel import kernel_isa

    def call() -> None:
        kernel_isa(isa)
        try:
            run()
        finally:
            kernel_isa('best')
    return call


def _call(fn: Callable, inputs: Sequence[torch.Tensor | None], backward: bool) -> Callable[[], None]:
    """One timed call of ``fn(*inputs)``: the forward, and with ``backward`` the gradients of every
    input but the last (q, k and v, or the packed qkv; the last is alpha).

    The output gradient is an input of the backward, like q, k and v are of the forward: it is made
    once, on the first call, in the output's layout, and reused, so that no call times its creation.
    """
    tensors, alpha = tuple(inputs[:-1]), inputs[-1]
    grad_out: list[torch.Tensor] = []

    def run() -> None:
        with torch.set_grad_enabled(backward):
            out = fn(*tensors, alpha)
            if backward:
                if not grad_out:
                    grad_out.append(torch.ones_like(out))
                torch.autograd.grad(out, tensors, grad_out[0])
    return run


def benchmark_attention(grids: Sequence[int], paths: Sequence[str], batch: int = 1, heads: int = 3,
                        head_dim: int = 32, mask_size: int = 3, repeats: int = 5, warmup: int = 1,
                        dtype: torch.dtype = torch.float32, device: str = 'cpu',
                        max_quadratic_tokens: int = 112 * 112, layout: str = 'heads',
                        log: Callable[[str], None] | None = None,
                        kernel_isas: Sequence[str] = ()) -> list[dict]:
    """One row per (grid, path, pass) with the median and every repetition's milliseconds and the
    peak MiB of one call.

    Every grid and path of a pass is timed alternately in each repetition, so that drift on a shared
    machine moves all of them alike and the growth from one grid to the next can be paired by
    repetition (:func:`summarise`)."""
    if layout not in LAYOUTS:
        raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
    dev = torch.device(device)
    if kernel_isas:
        from ..ops.cpu_kernel import kernel_isa

        if dev.type != 'cpu' or not any(p in KERNEL_PATHS for p in paths):
            raise ValueError(f'kernel_isas times the CPU kernel: it needs device cpu and a path of {KERNEL_PATHS}, '
                             f'got device {device!r} and paths {list(paths)}')
        for isa in kernel_isas:
            try:
                kernel_isa(isa)
            except RuntimeError as err:
                raise ValueError(f'kernel_isas: {isa!r} cannot run here ({err})') from None
            finally:
                kernel_isa('best')
        paths = [f'{p}@{isa}' if p in KERNEL_PATHS else p for p in paths
                 for isa in (kernel_isas if p in KERNEL_PATHS else [None])]
    inputs, runnable = {}, {}
    for side in grids:
        n = side * side
        g = torch.Generator(device='cpu').manual_seed(side)
        if layout == 'packed':
            tensors = [torch.randn(batch, n, 3, heads, head_dim, generator=g).to(dev, dtype).requires_grad_()]
        else:
            tensors = [torch.randn(batch, heads, n, head_dim, generator=g).to(dev, dtype).requires_grad_()
                       for _ in range(3)]
        inputs[side] = [*tensors, torch.full((heads,), 0.5, device=dev, dtype=dtype)]
        runnable[side] = [p for p in paths if not (p in QUADRATIC and n > max_quadratic_tokens)]
    rows = []
    for passes in ('fwd', 'fwd+bwd'):
        calls = {}
        for side in grids:
            for p in runnable[side]:
                base, _, isa = p.partition('@')
                run = _call(path_fn(base, (side, side), mask_size, layout), inputs[side], passes == 'fwd+bwd')
                calls[f'{side}x{side} {p}'] = _with_kernel_isa(run, isa) if isa else run
        if log is not None:
            log(passes)
        times, errors = time_alternating(calls, reps=repeats, warmup=warmup, device=dev, log=log)
        for side in grids:
            for p in paths:
                key = f'{side}x{side} {p}'
                row = dict(grid=side, tokens=side * side, path=p, passes=passes, ms=None, peak_mib=None,
                           repetitions_ms=None, note=errors.get(key, ''))
                if p not in runnable[side]:
                    row['note'] = f'skipped: quadratic path above {max_quadratic_tokens} tokens'
                elif key in times:
                    row.update(ms=1e3 * statistics.median(times[key]), peak_mib=peak_memory_mib(calls[key], dev),
                               repetitions_ms=[1e3 * t for t in times[key]])
                rows.append(row)
    order = {side: i for i, side in enumerate(grids)}
    return sorted(rows, key=lambda r: order[r['grid']])  # stable: by grid, then pass, then path


def summarise(rows: Sequence[dict]) -> dict:
    """Growth from one grid to the next per path, as the ratio of medians and as the median of the
    ratios within each repetition (the grids alternate within a repetition), and every path's
    speed-up over the portable path."""
    done = {(r['grid'], r['path'], r['passes']): r for r in rows if r['ms']}
    grids = sorted({r['grid'] for r in rows})
    summary = {}
    for (grid, path, passes), row in sorted(done.items()):
        bigger = [g for g in grids if g > grid]
        if bigger and (bigger[0], path, passes) in done:
            other = done[(bigger[0], path, passes)]
            name = f'{path} {passes}: t({bigger[0]}^2) / t({grid}^2)'
            summary[name] = other['ms'] / row['ms']
            larger, smaller = other['repetitions_ms'], row['repetitions_ms']
            if len(larger) == len(smaller):
                summary[f'{name}, median per repetition'] = statistics.median(
                    a / b for a, b in zip(larger, smaller))
        for mode in ('hard', 'strict'):
            portable = done.get((grid, f'{mode}-torch', passes))
            if path == mode and portable:
                summary[f'{path} {passes} at {grid}^2: speed-up over {mode}-torch'] = portable['ms'] / row['ms']
    return summary


def table(rows: Sequence[dict]) -> str:
    shown = [dict(r, grid=f"{r['grid']}x{r['grid']}",
                  repetitions_ms=' '.join(f'{t:.2f}' for t in r['repetitions_ms'] or []) or None) for r in rows]
    return markdown_table([('grid', 'grid'), ('tokens', 'tokens:'), ('path', 'path'), ('passes', 'passes'),
                           ('ms', 'median ms:'), ('peak_mib', 'peak MiB:'), ('repetitions_ms', 'ms per repetition'),
                           ('note', 'note')], shown)


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """The card's peak memory bandwidth in GB/s from its memory clock and bus width (double data rate)."""
    if device.type != 'cuda':
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, 'memory_clock_rate', 0), getattr(props, 'memory_bus_width', 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def kernel_bandwidth(device: torch.device, batch: int = 64, heads: int = 3, grid: int = 56, head_dim: int = 32,
                     precisions: Sequence[str] = ('fp32', 'bf16'), iters: int = 20, reps: int = 5) -> list[dict]:
    """One hard-mode masked-head layer at stage-1 shapes: the device's kernels against the PyTorch path.

    Bandwidth counts the least traffic any implementation needs: reading q, k, v and writing the
    output (forward), plus reading q, k, v, output and its gradient and writing dq, dk, dv (backward).
    """
    peak = peak_bandwidth_gbs(device)
    n = grid * grid
    rows = []
    for precision in precisions:
        dtype = torch.float32 if precision == 'fp32' else torch.bfloat16
        tensor_bytes = batch * heads * n * head_dim * torch.tensor([], dtype=dtype).element_size()
        inputs = [torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
                  for _ in range(3)] + [None]
        for direction, traffic in (('forward', 4), ('forward+backward', 12)):
            backends = {'kernel': 'auto', 'torch': 'torch'}
            calls = {name: _call(lambda q, k, v, a, b=backend: masked_attention(q, k, v, (grid, grid), 3, 'hard',
                                                                                backend=b),
                                 inputs, direction != 'forward') for name, backend in backends.items()}
            times, errors = time_alternating(calls, reps=reps, iters=iters, warmup=3, device=device)
            for name in backends:
                row = dict(backend=name, precision=precision, direction=direction, shape=[batch, heads, n, head_dim],
                           error=errors.get(name))
                if name in times:
                    t = statistics.median(times[name])
                    gbs = traffic * tensor_bytes / t / 1e9
                    row.update(ms=1e3 * t, gb_per_s=gbs, fraction_of_peak=gbs / peak if peak else None)
                rows.append(row)
    return rows


def kernel_table(rows: Sequence[dict]) -> str:
    shown = [dict(r, ms=r.get('ms') if r['error'] is None else r['error']) for r in rows]
    return markdown_table([('backend', 'backend'), ('precision', 'precision'), ('direction', 'pass'),
                           ('ms', 'ms:'), ('gb_per_s', 'GB/s:'), ('fraction_of_peak', 'fraction of peak bandwidth:')],
                          shown)
