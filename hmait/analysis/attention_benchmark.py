"""Time and peak memory of the masked-attention paths against the dense reference and global SDPA.

Used by ``tools/analysis/benchmark_attention.py``. Paths are timed round-robin (one repetition
of each in turn) so that load changes on a shared machine hit all of them alike; medians are
reported. Peak memory is the largest total size of tensors alive at once that the call itself
created (inputs excluded): on CUDA from the caching allocator's statistics, on CPU by tracking
every tensor produced under a dispatch mode until it is freed.
"""
from __future__ import annotations

import platform
import statistics
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops import dense_masked_attention, masked_attention

PATHS = ('hard', 'strict', 'soft', 'dense-hard', 'sdpa-global')


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and still referenced."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type == 'cpu':
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, key, storage.nbytes())
        return out


def hardware() -> dict:
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_count=torch.get_num_threads(), torch=torch.__version__)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    return info


def _path_fn(path: str, hw: tuple[int, int], mask_size: int) -> Callable:
    def fn(q, k, v, alpha):
        if path in ('hard', 'strict', 'soft'):
            return masked_attention(q, k, v, hw, mask_size, path, alpha)
        if path == 'dense-hard':
            return dense_masked_attention(q, k, v, hw, mask_size, 'hard')
        return F.scaled_dot_product_attention(q, k, v)
    return fn


def _quadratic(path: str) -> bool:
    return path in ('soft', 'dense-hard', 'sdpa-global')


def _run_once(fn, inputs, backward: bool, device: torch.device, track_memory: bool) -> tuple[float, int]:
    """Seconds of one call (and backward); peak bytes only when ``track_memory`` (the CPU tracker
    slows every op down, so timed calls run without it)."""
    q, k, v, alpha = (t.detach().requires_grad_(backward) for t in inputs)
    cuda = device.type == 'cuda'
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    tracker = _LiveTensorBytes() if track_memory and not cuda else None
    start = time.perf_counter()
    if tracker is not None:
        tracker.__enter__()
    try:
        out = fn(q, k, v, alpha)
        if backward:
            out.sum().backward()
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if cuda:
        return elapsed, torch.cuda.max_memory_allocated() - base
    return elapsed, tracker.peak if tracker is not None else 0


def benchmark_attention(grids: list[int], paths: list[str], batch: int = 1, heads: int = 3, head_dim: int = 32,
                        mask_size: int = 3, repeats: int = 5, warmup: int = 1, dtype: torch.dtype = torch.float32,
                        device: str = 'cpu', max_quadratic_tokens: int = 112 * 112) -> list[dict]:
    """One row per (grid, path, pass) with median seconds and peak bytes; quadratic paths are
    skipped above ``max_quadratic_tokens`` tokens (their (N, N) maps would not fit or take minutes)."""
    dev = torch.device(device)
    rows = []
    for side in grids:
        n = side * side
        g = torch.Generator(device='cpu').manual_seed(side)
        inputs = [torch.randn(batch, heads, n, head_dim, generator=g).to(dev, dtype) for _ in range(3)]
        inputs.append(torch.full((heads,), 0.5, device=dev, dtype=dtype))
        runnable = [p for p in paths if not (_quadratic(p) and n > max_quadratic_tokens)]
        for p in paths:
            if p not in runnable:
                for passes in ('fwd', 'fwd+bwd'):
                    rows.append(dict(grid=side, tokens=n, path=p, passes=passes, seconds=None, peak_bytes=None,
                                     note=f'skipped: quadratic path above {max_quadratic_tokens} tokens'))
        for backward in (False, True):
            fns = {p: _path_fn(p, (side, side), mask_size) for p in runnable}
            peaks = {p: _run_once(fns[p], inputs, backward, dev, track_memory=True)[1] for p in runnable}
            times = {p: [] for p in runnable}
            for rep in range(warmup + repeats):
                for p in runnable:  # round-robin: every path sees the same machine state
                    seconds, peak = _run_once(fns[p], inputs, backward, dev, track_memory=False)
                    if rep >= warmup:
                        times[p].append(seconds)
                    if dev.type == 'cuda':
                        peaks[p] = max(peaks[p], peak)
            for p in runnable:
                rows.append(dict(grid=side, tokens=n, path=p, passes='fwd+bwd' if backward else 'fwd',
                                 seconds=statistics.median(times[p]), peak_bytes=peaks[p], note=''))
    return rows


def summarise(rows: list[dict]) -> dict:
    """The issue's targets: scaling of hard/strict from 56^2 to 112^2, and speed/memory vs dense at 112^2."""
    def get(grid, path, passes='fwd'):
        for r in rows:
            if r['grid'] == grid and r['path'] == path and r['passes'] == passes and r['seconds']:
                return r
        return None
    summary = {}
    for path in ('hard', 'strict'):
        a, b = get(56, path), get(112, path)
        if a and b:
            summary[f'{path}: t(112^2)/t(56^2)'] = b['seconds'] / a['seconds']
        d = get(112, 'dense-hard')
        if b and d:
            summary[f'{path}: dense time / {path} time at 112^2'] = d['seconds'] / b['seconds']
            summary[f'{path}: dense peak memory / {path} peak memory at 112^2'] = d['peak_bytes'] / b['peak_bytes']
    return summary


def markdown_table(rows: list[dict]) -> str:
    lines = ['| grid | tokens | path | passes | median ms | peak MiB | note |', '|---|---|---|---|---|---|---|']
    for r in rows:
        ms = f"{r['seconds'] * 1e3:.1f}" if r['seconds'] is not None else '-'
        mib = f"{r['peak_bytes'] / 2 ** 20:.1f}" if r['peak_bytes'] is not None else '-'
        lines.append(f"| {r['grid']}x{r['grid']} | {r['tokens']} | {r['path']} | {r['passes']} | {ms} | {mib} "
                     f"| {r['note']} |")
    return '\n'.join(lines)
