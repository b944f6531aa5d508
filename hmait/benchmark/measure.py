"""The measuring pieces every benchmark shares.

* :func:`time_alternating`: the one timer. Callables are timed in alternation, one repetition of
  each in turn, so that slow drifts of a shared machine (other jobs, clocks, thermals) hit all of
  them alike; callers take medians over the repetitions.
* :func:`peak_memory_mib`: the one memory measure: the peak, during one call, of the memory
  allocated by that call beyond what was allocated before it. On CUDA from the caching
  allocator's statistics; on CPU from torch's memory profiler (each allocation and free in time
  order). The resident set size is no measure of this: freed blocks stay resident in malloc's
  pools. Weights and anything else alive before the call are not counted.
* :func:`hardware_record`: the one hardware record: CPU, cores, threads, GPU, library versions,
  and the memory allocator's settings (CPU timings of large tensors depend on them, see
  :data:`ALLOCATOR_VARIABLES`).
* :func:`markdown_table` and :func:`record`: the one table writer and the JSON payload head
  (command, date, hardware) that every benchmark writes.
"""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import torch

#: Errors that end one benchmarked callable without ending the whole run.
RUN_ERRORS = (RuntimeError, ValueError, ImportError, torch.OutOfMemoryError)

#: Environment variables that change how CPU memory is allocated. With glibc's defaults, every
#: block above 32 MiB is mapped afresh and its pages fault in on first write, which can cost more
#: than the arithmetic on it; a preloaded allocator (jemalloc, tcmalloc) or glibc tunables change
#: that. The hardware record keeps those that are set, so a figure says which allocator it had.
ALLOCATOR_VARIABLES = ('LD_PRELOAD', 'GLIBC_TUNABLES', 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_THRESHOLD_',
                       'MALLOC_TRIM_THRESHOLD_', 'MALLOC_CONF', 'TCMALLOC_RELEASE_RATE', 'THP_MEM_ALLOC_ENABLE')


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock time covers it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def describe_error(exc: BaseException) -> str:
    """A one-line description of why a callable could not be measured."""
    text = f'{type(exc).__name__}: {exc}'.splitlines()[0]
    return 'out of memory' if 'out of memory' in text.lower() else text[:200]


def time_alternating(fns: Mapping[str, Callable[[], object]], *, reps: int, iters: int = 1, warmup: int = 1,
                     device: torch.device | str = 'cpu',
                     log: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call of every callable, for each of ``reps`` repetitions, measured alternately.

    Each callable first runs ``warmup`` times. Then every repetition times ``iters`` calls of each
    callable in turn and records their mean. A callable that raises one of :data:`RUN_ERRORS` is
    dropped, and the reason is returned instead of its times.

    Returns ``(times, errors)``: ``times[name]`` has ``reps`` entries for every callable that ran.
    """
    if reps <= 0 or iters <= 0 or warmup < 0:
        raise ValueError(f'reps and iters must be positive and warmup non-negative, '
                         f'got reps={reps}, iters={iters}, warmup={warmup}')
    device = torch.device(device)
    live = dict(fns)
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}

    def drop(name: str, exc: BaseException) -> None:
        errors[name] = describe_error(exc)
        live.pop(name)
        times.pop(name)
        gc.collect()
        if device.type == 'cuda':
            torch.cuda.empty_cache()

    for name, fn in list(live.items()):
        try:
            for _ in range(warmup):
                fn()
            sync(device)
        except RUN_ERRORS as exc:
            drop(name, exc)
    for rep in range(reps):
        for name, fn in list(live.items()):
            try:
                sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - start) / iters)
            except RUN_ERRORS as exc:
                drop(name, exc)
        if log is not None:
            log(f'  rep {rep + 1}/{reps}: ' + ', '.join(f'{n} {1e3 * t[-1]:.1f} ms' for n, t in times.items()))
    return times, errors


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    # torch's profiler library (kineto) writes start/stop lines and, without a GPU, an 'ERROR' about the
    # GPU count to stderr when it first starts; level 6 silences them. Read at that first start, so
    # a level set before (in the environment or earlier in the process) is kept.
    os.environ.setdefault('KINETO_LOG_LEVEL', '6')
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each '[memory]' event is one allocation (+bytes) or free (-bytes); the running sum in time
    # order is what the call holds beyond what was alive before it.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str = 'cpu') -> float:
    """Peak memory, in MiB, that one call of ``fn`` allocates beyond what was allocated before it."""
    device = torch.device(device)
    gc.collect()
    if device.type == 'cuda':
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    return _cpu_peak_bytes(fn) / 2 ** 20


def hardware_record(device: torch.device | str = 'cpu') -> dict:
    """What a figure depends on: CPU model, cores and threads, GPU, and library versions."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    info = dict(cpu=cpu, cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                python=platform.python_version(), platform=platform.platform(), torch=torch.__version__,
                libc=' '.join(platform.libc_ver()).strip() or 'unknown',
                allocator={name: os.environ[name] for name in ALLOCATOR_VARIABLES if os.environ.get(name)} or 'default')
    with contextlib.suppress(AttributeError, OSError):
        info['cpu_cores_available'] = len(os.sched_getaffinity(0))
    with contextlib.suppress(ImportError):
        import timm
        info['timm'] = timm.__version__
    with contextlib.suppress(ImportError):
        import onnxruntime
        info['onnxruntime'] = onnxruntime.__version__
    with contextlib.suppress(ImportError):  # the package's metadata: importing openvino takes a while
        from importlib.metadata import PackageNotFoundError, version
        with contextlib.suppress(PackageNotFoundError):
            info['openvino'] = version('openvino')
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        with contextlib.suppress(ImportError):
            import triton
            info['triton'] = triton.__version__
    return info


def hardware_line(info: Mapping) -> str:
    """One line for a table caption: GPU or CPU, cores, threads, versions, and the allocator's
    settings where any are set."""
    where = info.get('gpu') or info['cpu']
    allocator = info.get('allocator', 'default')
    return (f"{where} ({info['cpu_cores']} CPU cores, {info['torch_threads']} torch threads), "
            f"torch {info['torch']}" + (f", timm {info['timm']}" if 'timm' in info else '')
            + ('' if allocator == 'default' else ', allocator ' + ' '.join(f'{k}={v}' for k, v in allocator.items())))


def record(device: torch.device | str, argv: Sequence[str] | None = None, **payload) -> dict:
    """The JSON payload every benchmark writes: the command, the date and the hardware, then ``payload``."""
    argv = sys.argv if argv is None else argv
    return dict(command=' '.join([os.path.basename(sys.executable), *argv]),
                date=time.strftime('%Y-%m-%d %H:%M %Z'), hardware=hardware_record(device), device=str(device),
                **payload)


def markdown_table(columns: Sequence[tuple[str, str]], rows: Sequence[Mapping]) -> str:
    """A markdown table; ``columns`` are ``(key, header)``. Floats print with 2 decimals (3
    significant digits below 0.1), None as ``-``; a header ending in ``:`` is right-aligned."""
    def cell(value) -> str:
        if value is None:
            return '-'
        if isinstance(value, float):
            return f'{value:.2f}' if abs(value) >= 0.1 or value == 0 else f'{value:.3g}'
        return str(value)

    headers = [header.rstrip(':') for _, header in columns]
    align = ['---:' if header.endswith(':') else '---' for _, header in columns]
    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join(align) + '|']
    lines += ['| ' + ' | '.join(cell(row.get(key)) for key, _ in columns) + ' |' for row in rows]
    return '\n'.join(lines)
