"""Throughput and peak memory of H-MaiT against timm's Swin, measured side by side.

Every model of a comparison is built in the same process and measured in alternation: each
repetition times every model once, in turn, so slow drifts of a shared machine (other jobs,
clocks, thermals) hit all models alike. Results are the medians over repetitions, and the
ratio H-MaiT / Swin is taken between models of the same size (tiny with tiny, small with small).

Procedure (Swin's throughput measurement): a fixed random batch, warm-up iterations, then timed
iterations; images/s = batch * iterations / seconds. ``inference`` runs the forward pass under
``torch.inference_mode``; ``train`` runs forward, cross-entropy, backward and an AdamW step.

Peak memory:
  * CUDA: ``torch.cuda.max_memory_allocated`` during one iteration (weights, gradients and
    optimiser state included), after ``reset_peak_memory_stats``.
  * CPU: the peak, during one iteration, of the bytes held by tensors allocated in that
    iteration, from torch's memory profiler (``torch.profiler.profile(profile_memory=True)``):
    activations, gradients and temporaries, not the weights or anything alive before the step.
    (The process's resident set is no measure of this: freed blocks stay resident in malloc's pools.)
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# H-MaiT model -> the Swin it is compared with (same dims, depths and heads).
PAIRS = {
    'hmait_tiny': 'swin_tiny_patch4_window7_224',
    'hmait_small': 'swin_small_patch4_window7_224',
    'hmait_base': 'swin_base_patch4_window7_224',
}
MODES = ('inference', 'train')
PRECISIONS = ('fp32', 'bf16')
COMPILE_MODES = ('eager', 'compile')


@dataclass
class Measurement:
    """One (model, setting) cell: medians over repetitions; ``error`` is set when it could not run."""

    model: str
    mode: str
    precision: str
    compile: str
    resolution: int
    batch: int
    images_per_s: float | None = None
    ms_per_iter: float | None = None
    peak_memory_mib: float | None = None
    repetitions_images_per_s: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class Setting:
    mode: str
    precision: str
    compile: str
    resolution: int
    batch: int


def hardware_info(device: torch.device) -> dict:
    """CPU model and cores, GPU name and memory, library versions: what a figure depends on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    info = dict(cpu=cpu, cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                python=platform.python_version(), platform=platform.platform(), torch=torch.__version__)
    with contextlib.suppress(AttributeError, OSError):
        info['cpu_cores_available'] = len(os.sched_getaffinity(0))
    import timm
    info['timm'] = timm.__version__
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        with contextlib.suppress(ImportError):
            import triton
            info['triton'] = triton.__version__
    return info


def build_model(name: str, resolution: int, device: torch.device) -> nn.Module:
    """A freshly initialised timm model; Swin is built for ``resolution`` (its windows depend on it)."""
    import timm

    import hmait  # noqa: F401  (registers the hmait_* models with timm)
    if not timm.is_model(name):
        raise ValueError(f'model {name!r} is not a timm model; H-MaiT and Swin pairs: {PAIRS}')
    kwargs = {} if name.startswith('hmait') else dict(img_size=resolution)
    return timm.create_model(name, num_classes=1000, **kwargs).to(device)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def make_step(model: nn.Module, setting: Setting, device: torch.device) -> Callable[[], None]:
    """One benchmark iteration on a fixed random batch: a forward pass or a full training step."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(setting.batch, 3, setting.resolution, setting.resolution, generator=gen).to(device)
    target = torch.randint(0, 1000, (setting.batch,), generator=gen).to(device)
    if setting.mode == 'inference':
        model.eval()
        fn = torch.compile(model) if setting.compile == 'compile' else model

        def step() -> None:
            with torch.inference_mode(), _autocast(device, setting.precision):
                fn(images)
        return step

    from timm.optim import create_optimizer_v2
    model.train()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)
    fn = torch.compile(model) if setting.compile == 'compile' else model

    def step() -> None:
        with _autocast(device, setting.precision):
            loss = F.cross_entropy(fn(images), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of the bytes held by torch's CPU allocations made during ``step`` (torch's memory profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each '[memory]' event is one allocation (+bytes) or free (-bytes); the running sum in time
    # order is what the step holds beyond what was alive before it.
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


def peak_memory_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak memory of one call of ``step`` in MiB (see the module docstring for what is counted)."""
    gc.collect()
    if device.type == 'cuda':
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return _cpu_peak_bytes(step) / 2 ** 20


def _time(step: Callable[[], None], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return time.perf_counter() - start


def _describe(exc: BaseException) -> str:
    text = f'{type(exc).__name__}: {exc}'.splitlines()[0]
    return 'out of memory' if 'out of memory' in text.lower() else text[:200]


def measure_alternating(models: Sequence[str], setting: Setting, device: torch.device, warmup: int,
                        iters: int, reps: int, log: Callable[[str], None] = print) -> list[Measurement]:
    """Measure every model under one setting, alternating models within each repetition."""
    results = {name: Measurement(name, **asdict(setting)) for name in models}
    if setting.compile == 'compile':
        # Compiled graphs of earlier settings are dead; dropping them keeps every model of this
        # setting well inside dynamo's recompile limit (models of one family share forward code).
        torch._dynamo.reset()
    steps: dict[str, Callable[[], None]] = {}
    built: dict[str, nn.Module] = {}
    for name in models:
        try:
            built[name] = build_model(name, setting.resolution, device)
            steps[name] = make_step(built[name], setting, device)
            for _ in range(warmup):
                steps[name]()
            _sync(device)
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as exc:
            results[name].error = _describe(exc)
            steps.pop(name, None)
            built.pop(name, None)
            _free(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for rep in range(reps):
        for name in list(steps):
            try:
                times[name].append(_time(steps[name], iters, device))
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                results[name].error = _describe(exc)
                steps.pop(name)
                _free(device)
        log(f'  rep {rep + 1}/{reps}: ' + ', '.join(
            f'{n} {setting.batch * iters / times[n][-1]:.1f} img/s' for n in steps if times[n]))
    for name, step in steps.items():
        res = results[name]
        res.repetitions_images_per_s = [setting.batch * iters / t for t in times[name]]
        res.images_per_s = statistics.median(res.repetitions_images_per_s)
        res.ms_per_iter = 1000 * statistics.median(times[name]) / iters
        try:
            res.peak_memory_mib = peak_memory_mib(step, device)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            res.error = _describe(exc)
    del steps, built
    _free(device)
    return [results[name] for name in models]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def ratios(measurements: Sequence[Measurement]) -> list[dict]:
    """H-MaiT / Swin ratios of throughput and peak memory for every setting where both ran."""
    key = lambda m: (m.mode, m.precision, m.compile, m.resolution, m.batch)  # noqa: E731
    by_key = {(key(m), m.model): m for m in measurements}
    rows = []
    for m in measurements:
        swin = by_key.get((key(m), PAIRS.get(m.model)))
        if swin is None or m.images_per_s is None or swin.images_per_s is None:
            continue
        mem = (m.peak_memory_mib / swin.peak_memory_mib
               if m.peak_memory_mib and swin.peak_memory_mib else None)
        rows.append(dict(model=m.model, swin=swin.model, mode=m.mode, precision=m.precision,
                         compile=m.compile, resolution=m.resolution, batch=m.batch,
                         throughput_ratio=m.images_per_s / swin.images_per_s, memory_ratio=mem))
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return '-' if value is None else format(value, spec)


def markdown_table(measurements: Sequence[Measurement]) -> str:
    """One row per measurement, with the H-MaiT / Swin ratios on the H-MaiT rows."""
    ratio = {(r['model'], r['mode'], r['precision'], r['compile'], r['resolution'], r['batch']): r
             for r in ratios(measurements)}
    lines = ['| model | mode | precision | compile | resolution | batch | images/s | ms/iter | peak MiB '
             '| throughput vs Swin | memory vs Swin |',
             '|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|']
    for m in measurements:
        r = ratio.get((m.model, m.mode, m.precision, m.compile, m.resolution, m.batch), {})
        speed = _fmt(m.images_per_s, '.1f') if m.error is None else m.error
        lines.append(f'| {m.model} | {m.mode} | {m.precision} | {m.compile} | {m.resolution} | {m.batch} '
                     f'| {speed} | {_fmt(m.ms_per_iter, ".1f")} | {_fmt(m.peak_memory_mib, ".0f")} '
                     f'| {_fmt(r.get("throughput_ratio"), ".2f")} | {_fmt(r.get("memory_ratio"), ".2f")} |')
    return '\n'.join(lines)


def plot_sweep(measurements: Sequence[Measurement], path: str) -> bool:
    """Throughput and peak memory against resolution, one line per model and setting.

    Returns False (and writes nothing) when no setting was measured at more than one resolution.
    """
    series: dict[tuple[str, str, str, str, int], list[Measurement]] = {}
    for m in measurements:
        series.setdefault((m.model, m.mode, m.precision, m.compile, m.batch), []).append(m)
    series = {k: sorted(v, key=lambda m: m.resolution) for k, v in series.items()
              if len({m.resolution for m in v}) > 1}
    if not series:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (model, mode, precision, comp, batch), ms in sorted(series.items()):
        ok = [m for m in ms if m.images_per_s is not None]
        style = '-' if model.startswith('hmait') else '--'
        label = f'{model} {mode} {precision} {comp} batch {batch}'
        ax_speed.plot([m.resolution for m in ok], [m.images_per_s for m in ok], style, marker='o',
                      label=label)
        mem = [m for m in ok if m.peak_memory_mib is not None]
        ax_mem.plot([m.resolution for m in mem], [m.peak_memory_mib for m in mem], style, marker='o',
                    label=label)
    for ax, title in ((ax_speed, 'throughput (images/s)'), (ax_mem, 'peak memory (MiB)')):
        ax.set_xlabel('resolution (px)')
        ax.set_yscale('log')
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """The card's peak memory bandwidth in GB/s from its memory clock and bus width (double data rate)."""
    if device.type != 'cuda':
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, 'memory_clock_rate', 0), getattr(props, 'memory_bus_width', 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def kernel_bandwidth(device: torch.device, batch: int = 64, heads: int = 3, grid: int = 56,
                     head_dim: int = 32, precisions: Sequence[str] = ('fp32', 'bf16'), iters: int = 20,
                     reps: int = 5) -> list[dict]:
    """Time of one hard-mode masked head layer at stage-1 shapes, Triton kernels against the PyTorch path.

    Bandwidth counts the least traffic any implementation needs: reading q, k, v and writing the
    output (forward), plus reading q, k, v, output and its gradient and writing dq, dk, dv (backward).
    Backends alternate within each repetition; times are medians.
    """
    from ..ops import masked_attention
    peak = peak_bandwidth_gbs(device)
    n = grid * grid
    rows = []
    for precision in precisions:
        dtype = torch.float32 if precision == 'fp32' else torch.bfloat16
        tensor_bytes = batch * heads * n * head_dim * torch.tensor([], dtype=dtype).element_size()
        qkv = [torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3)]
        grad = torch.randn(batch, heads, n, head_dim, device=device, dtype=dtype)
        for direction, traffic in (('forward', 4), ('forward+backward', 12)):
            def run(backend: str, direction: str = direction, qkv: list = qkv,
                    grad: torch.Tensor = grad) -> None:
                with torch.set_grad_enabled(direction != 'forward'):
                    out = masked_attention(*qkv, (grid, grid), 3, 'hard', backend=backend)
                    if direction != 'forward':
                        torch.autograd.grad(out, qkv, grad)

            backends = ('triton', 'torch')
            times: dict[str, list[float]] = {b: [] for b in backends}
            errors: dict[str, str] = {}
            for backend in backends:
                try:
                    for _ in range(3):
                        run(backend)
                except (RuntimeError, ImportError, torch.OutOfMemoryError) as exc:
                    errors[backend] = _describe(exc)
            for _ in range(reps):
                for backend in backends:
                    if backend not in errors:
                        times[backend].append(_time(lambda b=backend: run(b), iters, device) / iters)
            for backend in backends:
                row = dict(backend=backend, precision=precision, direction=direction,
                           shape=[batch, heads, n, head_dim], error=errors.get(backend))
                if times[backend]:
                    t = statistics.median(times[backend])
                    gbs = traffic * tensor_bytes / t / 1e9
                    row.update(ms=1e3 * t, gb_per_s=gbs, fraction_of_peak=gbs / peak if peak else None)
                rows.append(row)
        del qkv, grad
        _free(device)
    return rows


def kernel_table(rows: Sequence[dict]) -> str:
    lines = ['| backend | precision | pass | ms | GB/s | fraction of peak bandwidth |',
             '|---|---|---|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['backend']} | {r['precision']} | {r['direction']} | "
                     f"{_fmt(r.get('ms'), '.2f') if r['error'] is None else r['error']} | "
                     f"{_fmt(r.get('gb_per_s'), '.0f')} | {_fmt(r.get('fraction_of_peak'), '.2f')} |")
    return '\n'.join(lines)


@dataclass
class BenchmarkPlan:
    """What to run. ``main_*`` is the fixed-resolution comparison, ``sweep_*`` the resolution sweep."""

    models: list[str]
    modes: list[str]
    precisions: list[str]
    compile_modes: list[str]
    batch: int
    resolution: int
    sweep_resolutions: list[int]
    sweep_inference_only: list[int]
    sweep_batch: int
    sweep_modes: list[str]
    warmup: int
    iters: int
    reps: int
    kernel: bool = False

    def settings(self) -> list[Setting]:
        main = [Setting(mode, precision, comp, self.resolution, self.batch)
                for precision in self.precisions for comp in self.compile_modes for mode in self.modes]
        # The sweep runs in the first precision and eager mode; its 224 px point at sweep_batch is its own.
        sweep = [Setting(mode, self.precisions[0], 'eager', res, self.sweep_batch)
                 for res in self.sweep_resolutions for mode in self.sweep_modes]
        sweep += [Setting('inference', self.precisions[0], 'eager', res, self.sweep_batch)
                  for res in self.sweep_inference_only if 'inference' in self.sweep_modes]
        return main + [s for s in sweep if s not in main]


def default_plan(device: torch.device) -> BenchmarkPlan:
    """Swin's GPU procedure with a GPU; a small plan a shared CPU finishes in minutes without one."""
    if device.type == 'cuda':
        return BenchmarkPlan(models=['hmait_tiny', PAIRS['hmait_tiny'], 'hmait_small', PAIRS['hmait_small']],
                             modes=list(MODES), precisions=['fp32', 'bf16'],
                             compile_modes=['eager', 'compile'],
                             batch=64, resolution=224, sweep_resolutions=[224, 384, 512, 768, 1024],
                             sweep_inference_only=[2048], sweep_batch=8, sweep_modes=list(MODES),
                             warmup=10, iters=30, reps=5, kernel=True)
    return BenchmarkPlan(models=['hmait_tiny', PAIRS['hmait_tiny']], modes=list(MODES), precisions=['fp32'],
                         compile_modes=['eager'], batch=8, resolution=224, sweep_resolutions=[],
                         sweep_inference_only=[], sweep_batch=1, sweep_modes=list(MODES), warmup=1, iters=2,
                         reps=3)


def validate_plan(plan: BenchmarkPlan, device: torch.device) -> None:
    for name, values, allowed in (('modes', plan.modes, MODES), ('precisions', plan.precisions, PRECISIONS),
                                  ('compile', plan.compile_modes, COMPILE_MODES),
                                  ('sweep modes', plan.sweep_modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f'{name} must be a non-empty list from {allowed}, got {values!r}')
    for name, value in (('batch', plan.batch), ('sweep batch', plan.sweep_batch), ('warmup', plan.warmup + 1),
                        ('iters', plan.iters), ('reps', plan.reps)):
        if value <= 0:
            raise ValueError(f'{name} must be positive (warmup non-negative), got {value}')
    for res in [plan.resolution, *plan.sweep_resolutions, *plan.sweep_inference_only]:
        if res <= 0 or res % 32:
            raise ValueError(f'resolutions must be positive multiples of 32 (the total stride), got {res}')
    if not plan.models:
        raise ValueError('models must name at least one timm model')


def run_benchmark(plan: BenchmarkPlan, device: torch.device,
                  log: Callable[[str], None] = print) -> list[Measurement]:
    validate_plan(plan, device)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    measurements = []
    for setting in plan.settings():
        log(f'{setting.mode} {setting.precision} {setting.compile} {setting.resolution}px '
            f'batch {setting.batch}')
        measurements += measure_alternating(plan.models, setting, device, plan.warmup, plan.iters, plan.reps,
                                            log)
    return measurements


def write_report(measurements: Sequence[Measurement], plan: BenchmarkPlan, device: torch.device, out_dir: str,
                 argv: Sequence[str], kernel_rows: Sequence[dict] = ()) -> dict:
    """Write ``benchmark.json`` (and ``benchmark.png`` for a sweep) to ``out_dir``; return the payload."""
    os.makedirs(out_dir, exist_ok=True)
    memory_note = ('torch.cuda.max_memory_allocated during one iteration' if device.type == 'cuda' else
                   'peak bytes of the tensors allocated during one iteration '
                   '(torch.profiler, profile_memory=True)')
    payload = dict(command=' '.join([os.path.basename(sys.executable), *argv]),
                   date=time.strftime('%Y-%m-%d %H:%M %Z'), hardware=hardware_info(device),
                   device=str(device), plan=asdict(plan), measurements=[asdict(m) for m in measurements],
                   ratios=ratios(measurements),
                   memory_note=memory_note, kernel=list(kernel_rows),
                   peak_bandwidth_gbs=peak_bandwidth_gbs(device))
    with open(os.path.join(out_dir, 'benchmark.json'), 'w') as f:
        json.dump(payload, f, indent=2)
    payload['plot'] = plot_sweep(measurements, os.path.join(out_dir, 'benchmark.png'))
    return payload
