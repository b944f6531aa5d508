"""Throughput and peak memory of H-MaiT, and of any other timm model, against timm's Swin, side by side.

Every model of a comparison is built in the same process and timed alternately
(:func:`hmait.benchmark.measure.time_alternating`); results are medians over repetitions, and
each model's ratio is taken against the Swin of its size (:func:`reference_swin`: H-MaiT-T,
ConvNeXt-T and DeiT-S against Swin-T, and so on), which the run adds when it is not listed.
Because every repetition times the pair back to back, the ratio is also given per repetition
(its median and range): load that drifts during a run moves both models of a repetition alike,
so the paired ratio is steadier than the ratio of the two medians on a shared machine.

Procedure (Swin's throughput measurement): a fixed random batch, warm-up iterations, then timed
iterations; images/s = batch / seconds per iteration. ``inference`` runs the forward pass under
``torch.inference_mode``; ``train`` runs forward, cross-entropy, backward and an AdamW step.
Runtimes: ``eager`` PyTorch, ``compile`` (``torch.compile``), ``onnxruntime`` (inference in
fp32 only: both models exported with ``torch.onnx.export(..., dynamo=True)`` at the benchmark's
batch and resolution, run by ONNX Runtime's CPU or CUDA provider with torch's thread count),
``openvino`` (the same standard files, run by OpenVINO on the CPU at inference precision f32 or bf16,
set explicitly), ``openvino-kernel`` (H-MaiT and MaiT exported with their masked heads as the
project's ``hmait.MaskedAttention`` nodes, in the run's precision, and run by OpenVINO with the
project's extension; every other model, Swin included, exported and run as under ``openvino``), and
``aoti`` (inference in fp32 only: each model compiled into an AOTInductor package at the benchmark's
batch and resolution, H-MaiT and MaiT with their masked heads as the C++ kernel's op).
Peak memory: :func:`hmait.benchmark.measure.peak_memory_mib` over one iteration (not measured
for the runtimes of exported files: ONNX Runtime's and OpenVINO's allocations are not torch's).

``<model>+attention-free`` (``benchmark.py --attention-free``) is an H-MaiT or MaiT model whose
attention layers keep their qkv and output projections but mix no tokens
(:func:`without_token_mixing`). Everything else runs as in the model, so its ratio against Swin is
about the most that any change to the attention (masked and global heads alike) could give it.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import statistics
import tempfile
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .measure import RUN_ERRORS, describe_error, markdown_table, peak_memory_mib, record, time_alternating

SWIN = {size: f'swin_{size}_patch4_window7_224' for size in ('tiny', 'small', 'base')}
# H-MaiT model -> the Swin it is compared with (same dims, depths and heads).
PAIRS = {f'hmait_{size}': swin for size, swin in SWIN.items()}
# Other anchors -> the Swin of their compute class (ImageNet FLOPs at 224 px): DeiT-S (4.6 G) is
# Swin-T's (4.5 G), DeiT-B (17.6 G) Swin-B's (15.4 G). Names with tiny/small/base pair by that word.
REFERENCES = {**PAIRS, 'deit_small_patch16_224': SWIN['tiny'], 'deit_base_patch16_224': SWIN['base'],
              'vit_small_patch16_224': SWIN['tiny'], 'vit_base_patch16_224': SWIN['base']}


# Suffix of a model's attention-free variant (see the module docstring).
ATTENTION_FREE = '+attention-free'
# The model families the variant exists for: those built on hmait.models.layers.MaskedMultiheadAttention.
ATTENTION_FREE_FAMILIES = ('hmait_', 'mait_')


def base_name(name: str) -> str:
    """The timm model a benchmark name builds: ``name`` without the attention-free suffix."""
    return name[:-len(ATTENTION_FREE)] if name.endswith(ATTENTION_FREE) else name


def reference_swin(name: str) -> str | None:
    """The Swin a model's ratio is taken against; None for a Swin itself or a model of no known size."""
    name = base_name(name)
    if name.startswith('swin_'):
        return None
    if name in REFERENCES:
        return REFERENCES[name]
    words = set(name.replace('.', '_').split('_'))
    for size, swin in SWIN.items():
        if size in words:
            return swin
    return None


def with_references(models: Sequence[str]) -> list[str]:
    """``models`` followed by every reference Swin they need that is not among them."""
    out = list(models)
    for name in models:
        ref = reference_swin(name)
        if ref is not None and ref not in out:
            out.append(ref)
    return out


BENCHMARK_MODES = ('inference', 'train')
PRECISIONS = ('fp32', 'bf16')
RUNTIMES = ('eager', 'compile', 'onnxruntime', 'openvino', 'openvino-kernel', 'aoti')
# The runtimes that run an exported file, for inference only, and those of them that run fp32 only.
EXPORTED_RUNTIMES = ('onnxruntime', 'aoti', 'openvino', 'openvino-kernel')
FP32_ONLY_RUNTIMES = ('onnxruntime', 'aoti')


@dataclass(frozen=True)
class Setting:
    mode: str
    precision: str
    runtime: str
    resolution: int
    batch: int

    def supported(self) -> bool:
        """Exported files run inference only, ONNX Runtime's and AOTInductor's in fp32 only (OpenVINO's in
        fp32 and bf16)."""
        if self.runtime not in EXPORTED_RUNTIMES:
            return True
        return self.mode == 'inference' and (self.precision == 'fp32' or self.runtime not in FP32_ONLY_RUNTIMES)


@dataclass
class Measurement:
    """One (model, setting) cell: medians over repetitions; ``error`` is set when it could not run."""

    model: str
    mode: str
    precision: str
    runtime: str
    resolution: int
    batch: int
    images_per_s: float | None = None
    ms_per_iter: float | None = None
    peak_memory_mib: float | None = None
    repetitions_images_per_s: list[float] = field(default_factory=list)
    error: str | None = None


def check_models(models: Sequence[str]) -> None:
    """Every name must be a timm model (``hmait_*`` included); the error names the first that is not."""
    import timm

    import hmait  # noqa: F401  (registers the hmait_* models with timm)
    for name in models:
        base = base_name(name)
        if not timm.is_model(base):
            close = difflib.get_close_matches(base, timm.list_models(), n=5)
            raise ValueError(f'model {base!r} is not a timm model{f"; similar: {close}" if close else ""}')
        if base != name and not base.startswith(ATTENTION_FREE_FAMILIES):
            raise ValueError(f'model {name!r}: the attention-free variant exists only for '
                             f'{", ".join(f + "*" for f in ATTENTION_FREE_FAMILIES)} models')


def _projections_only(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """An attention layer's forward without its attention: the value projection goes to proj as is."""
    b, n, c = x.shape
    v = self._qkv(x)[:, :, 2]                                     # (B, N, heads, d)
    return self.proj_drop(self.proj(v.reshape(b, n, c)))


def without_token_mixing(model: nn.Module) -> nn.Module:
    """``model`` with every :class:`~hmait.models.layers.MaskedMultiheadAttention` reduced to its qkv
    and output projections (same GEMMs, no attention); raises ValueError if it has none."""
    from hmait.models.layers import MaskedMultiheadAttention

    layers = [m for m in model.modules() if isinstance(m, MaskedMultiheadAttention)]
    if not layers:
        raise ValueError(f'{type(model).__name__} has no MaskedMultiheadAttention layer to make attention-free')
    for layer in layers:
        layer.forward = types.MethodType(_projections_only, layer)
    return model


def with_attention_free(models: Sequence[str]) -> list[str]:
    """``models`` with each H-MaiT or MaiT model followed by its attention-free variant."""
    out = []
    for name in models:
        out.append(name)
        variant = name + ATTENTION_FREE
        if name.startswith(ATTENTION_FREE_FAMILIES) and name == base_name(name) and variant not in models:
            out.append(variant)
    return out


def build_model(name: str, resolution: int, device: torch.device) -> nn.Module:
    """A freshly initialised timm model, made to take ``resolution`` as timm does it.

    Models with a fixed input size (Swin's windows and attention masks, ViT's position embedding)
    are resized with their ``set_input_size``; the others (H-MaiT, ConvNeXt) take any size as built.
    """
    from ..builder import create_timm_model

    check_models([name])
    model = create_timm_model(base_name(name), num_classes=1000)
    size = (resolution, resolution)
    if hasattr(model, 'set_input_size') and tuple(model.pretrained_cfg.get('input_size', (3, 0, 0))[1:]) != size:
        model.set_input_size(img_size=size)
    if name != base_name(name):
        without_token_mixing(model)
    return model.to(device)


def _autocast(device: torch.device, precision: str):
    if precision == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _exported_session(model: nn.Module, images: torch.Tensor, setting: Setting, device: torch.device,
                      workdir: str):
    """``model`` exported at ``images``' shape for ``setting.runtime``, behind ``run(None, feed)``."""
    path = os.path.join(workdir, f'{type(model).__name__}_{id(model)}')
    if setting.runtime == 'onnxruntime':
        import onnxruntime as ort

        with torch.no_grad():
            torch.onnx.export(model.eval(), (images,), path + '.onnx', input_names=['image'], dynamo=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        providers = ['CUDAExecutionProvider'] if device.type == 'cuda' else ['CPUExecutionProvider']
        return ort.InferenceSession(path + '.onnx', options, providers=providers)
    from ..deploy import AOTISession, OpenVINOSession, export_aoti, export_onnx

    if images.device.type != 'cpu':
        raise ValueError(f'runtime {setting.runtime!r} runs on the CPU only')
    if setting.runtime == 'aoti':
        return AOTISession(export_aoti(model.eval(), path + '.pt2', images))
    precision = 'f32' if setting.precision == 'fp32' else 'bf16'
    masked_heads = 'halo'
    if setting.runtime == 'openvino-kernel':
        masked_heads = 'openvino' if precision == 'f32' else 'openvino-bf16'
    export_onnx(model.eval(), path + '.onnx', images, masked_heads=masked_heads)
    return OpenVINOSession(path + '.onnx', precision)


def make_step(model: nn.Module, setting: Setting, device: torch.device, workdir: str) -> Callable[[], None]:
    """One benchmark iteration on a fixed random batch: a forward pass or a full training step."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(setting.batch, 3, setting.resolution, setting.resolution, generator=gen).to(device)
    target = torch.randint(0, 1000, (setting.batch,), generator=gen).to(device)
    if setting.runtime in EXPORTED_RUNTIMES:
        session = _exported_session(model, images, setting, device, workdir)
        feed = {'image': images.cpu().numpy()}

        def run_session() -> None:
            session.run(None, feed)
        return run_session
    if setting.mode == 'inference':
        model.eval()
        fn = torch.compile(model) if setting.runtime == 'compile' else model

        def step() -> None:
            with torch.inference_mode(), _autocast(device, setting.precision):
                fn(images)
        return step

    from timm.optim import create_optimizer_v2
    model.train()
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05)
    fn = torch.compile(model) if setting.runtime == 'compile' else model

    def step() -> None:
        with _autocast(device, setting.precision):
            loss = F.cross_entropy(fn(images), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure_setting(models: Sequence[str], setting: Setting, device: torch.device, warmup: int, iters: int,
                    reps: int, log: Callable[[str], None] | None = None) -> list[Measurement]:
    """Every model under one setting, timed alternately, then the peak memory of one iteration each."""
    results = {name: Measurement(name, **asdict(setting)) for name in models}
    if setting.runtime == 'compile':
        # Compiled graphs of earlier settings are dead; dropping them keeps every model of this
        # setting well inside dynamo's recompile limit (models of one family share forward code).
        torch._dynamo.reset()
    steps: dict[str, Callable[[], None]] = {}
    with tempfile.TemporaryDirectory(prefix='hmait-benchmark-') as workdir:
        for name in models:
            try:
                steps[name] = make_step(build_model(name, setting.resolution, device), setting, device, workdir)
            except RUN_ERRORS as exc:
                results[name].error = describe_error(exc)
        times, errors = time_alternating(steps, reps=reps, iters=iters, warmup=warmup, device=device, log=log)
        for name, seconds in times.items():
            res = results[name]
            res.repetitions_images_per_s = [setting.batch / t for t in seconds]
            res.ms_per_iter = 1e3 * statistics.median(seconds)
            res.images_per_s = setting.batch / statistics.median(seconds)
            if setting.runtime not in EXPORTED_RUNTIMES:
                try:
                    res.peak_memory_mib = peak_memory_mib(steps[name], device)
                except RUN_ERRORS as exc:
                    res.error = describe_error(exc)
        for name, reason in errors.items():
            results[name].error = reason
    return [results[name] for name in models]


def _key(m: Measurement) -> tuple:
    return m.mode, m.precision, m.runtime, m.resolution, m.batch


def ratios(measurements: Sequence[Measurement]) -> list[dict]:
    """Each model's ratios of throughput and peak memory to its reference Swin, wherever both ran."""
    by_key = {(_key(m), m.model): m for m in measurements}
    rows = []
    for m in measurements:
        swin = by_key.get((_key(m), reference_swin(m.model)))
        if swin is None or m.images_per_s is None or swin.images_per_s is None:
            continue
        mem = (m.peak_memory_mib / swin.peak_memory_mib
               if m.peak_memory_mib and swin.peak_memory_mib else None)
        per_repetition = [a / b for a, b in zip(m.repetitions_images_per_s, swin.repetitions_images_per_s)]
        paired = sorted(per_repetition)
        rows.append(dict(model=m.model, swin=swin.model, mode=m.mode, precision=m.precision,
                         runtime=m.runtime, resolution=m.resolution, batch=m.batch,
                         throughput_ratio=m.images_per_s / swin.images_per_s, memory_ratio=mem,
                         repetition_ratios=per_repetition,
                         paired_ratio=statistics.median(paired) if paired else None,
                         paired_ratio_range=f'{paired[0]:.2f}-{paired[-1]:.2f}' if paired else None))
    return rows


TABLE_COLUMNS = [('model', 'model'), ('mode', 'mode'), ('precision', 'precision'), ('runtime', 'runtime'),
                 ('resolution', 'resolution:'), ('batch', 'batch:'), ('images_per_s', 'images/s:'),
                 ('ms_per_iter', 'ms/iter:'), ('peak_memory_mib', 'peak MiB:'),
                 ('throughput_ratio', 'throughput vs Swin:'), ('paired_ratio', 'per repetition: median:'),
                 ('paired_ratio_range', 'range'), ('memory_ratio', 'memory vs Swin:'),
                 ('repetitions', 'images/s per repetition')]


def table(measurements: Sequence[Measurement]) -> str:
    """One row per measurement, with the ratios to the reference Swin on every other model's rows."""
    ratio = {(r['model'], r['mode'], r['precision'], r['runtime'], r['resolution'], r['batch']): r
             for r in ratios(measurements)}
    rows = []
    for m in measurements:
        row = asdict(m)
        row.update(ratio.get((m.model, *_key(m)), {}))
        if m.error is not None:
            row['images_per_s'] = m.error
        row['repetitions'] = ' '.join(f'{x:.1f}' for x in m.repetitions_images_per_s) or None
        rows.append(row)
    return markdown_table(TABLE_COLUMNS, rows)


def plot_sweep(measurements: Sequence[Measurement], path: str) -> bool:
    """Throughput and peak memory against resolution, one line per model and setting.

    Returns False (and writes nothing) when no setting was measured at more than one resolution.
    """
    series: dict[tuple, list[Measurement]] = {}
    for m in measurements:
        series.setdefault((m.model, m.mode, m.precision, m.runtime, m.batch), []).append(m)
    series = {k: sorted(v, key=lambda m: m.resolution) for k, v in series.items()
              if len({m.resolution for m in v}) > 1}
    if not series:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (model, mode, precision, runtime, batch), ms in sorted(series.items()):
        ok = [m for m in ms if m.images_per_s is not None]
        style = '-' if model.startswith('hmait') else '--'
        label = f'{model} {mode} {precision} {runtime} batch {batch}'
        ax_speed.plot([m.resolution for m in ok], [m.images_per_s for m in ok], style, marker='o', label=label)
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


@dataclass
class BenchmarkPlan:
    """What to run. ``main_*`` is the fixed-resolution comparison, ``sweep_*`` the resolution sweep."""

    models: list[str]
    modes: list[str]
    precisions: list[str]
    runtimes: list[str]
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
    attention_free: bool = False

    def settings(self) -> list[Setting]:
        main = [Setting(mode, precision, runtime, self.resolution, self.batch)
                for precision in self.precisions for runtime in self.runtimes for mode in self.modes]
        # The sweep runs in the first precision and eager mode; its 224 px point at sweep_batch is its own.
        sweep = [Setting(mode, self.precisions[0], 'eager', res, self.sweep_batch)
                 for res in self.sweep_resolutions for mode in self.sweep_modes]
        sweep += [Setting('inference', self.precisions[0], 'eager', res, self.sweep_batch)
                  for res in self.sweep_inference_only if 'inference' in self.sweep_modes]
        settings = main + [s for s in sweep if s not in main]
        return [s for s in settings if s.supported()]

    def validate(self) -> None:
        for name, values, allowed in (('modes', self.modes, BENCHMARK_MODES),
                                      ('precisions', self.precisions, PRECISIONS),
                                      ('runtimes', self.runtimes, RUNTIMES),
                                      ('sweep modes', self.sweep_modes, BENCHMARK_MODES)):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f'{name} must be a non-empty list from {allowed}, got {values!r}')
        for name, value in (('batch', self.batch), ('sweep batch', self.sweep_batch), ('iters', self.iters),
                            ('reps', self.reps)):
            if value <= 0:
                raise ValueError(f'{name} must be positive, got {value}')
        if self.warmup < 0:
            raise ValueError(f'warmup must be non-negative, got {self.warmup}')
        for res in [self.resolution, *self.sweep_resolutions, *self.sweep_inference_only]:
            if res <= 0 or res % 32:
                raise ValueError(f'resolutions must be positive multiples of 32 (the total stride), got {res}')
        if not self.models:
            raise ValueError('models must name at least one timm model')
        check_models(self.models)
        if not self.settings():
            raise ValueError('no setting to run: exported runtimes run inference only, onnxruntime and aoti in '
                             'fp32 only')


def default_plan(device: torch.device) -> BenchmarkPlan:
    """Swin's GPU procedure with a GPU; a small plan a shared CPU finishes in minutes without one."""
    if device.type == 'cuda':
        return BenchmarkPlan(models=['hmait_tiny', PAIRS['hmait_tiny'], 'hmait_small', PAIRS['hmait_small']],
                             modes=list(BENCHMARK_MODES), precisions=['fp32', 'bf16'], runtimes=['eager', 'compile'],
                             batch=64, resolution=224, sweep_resolutions=[224, 384, 512, 768, 1024],
                             sweep_inference_only=[2048], sweep_batch=8, sweep_modes=list(BENCHMARK_MODES),
                             warmup=10, iters=30, reps=5, kernel=True)
    return BenchmarkPlan(models=['hmait_tiny', PAIRS['hmait_tiny']], modes=list(BENCHMARK_MODES), precisions=['fp32'],
                         runtimes=['eager'], batch=8, resolution=224, sweep_resolutions=[],
                         sweep_inference_only=[], sweep_batch=1, sweep_modes=list(BENCHMARK_MODES), warmup=1, iters=2,
                         reps=3)


def run_benchmark(plan: BenchmarkPlan, device: torch.device,
                  log: Callable[[str], None] | None = None) -> list[Measurement]:
    plan.validate()
    plan.models = with_references(plan.models)
    if plan.attention_free:
        plan.models = with_attention_free(plan.models)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    measurements = []
    for setting in plan.settings():
        if log is not None:
            log(f'{setting.mode} {setting.precision} {setting.runtime} {setting.resolution}px batch {setting.batch}')
        measurements += measure_setting(plan.models, setting, device, plan.warmup, plan.iters, plan.reps, log)
    return measurements


def write_report(measurements: Sequence[Measurement], plan: BenchmarkPlan, device: torch.device, out_dir: str,
                 argv: Sequence[str] | None = None, kernel_rows: Sequence[dict] = (), **extra) -> dict:
    """Write ``benchmark.json`` (and ``benchmark.png`` for a sweep) to ``out_dir``; return the payload.

    ``extra``: further JSON-ready sections (the backbone comparison)."""
    os.makedirs(out_dir, exist_ok=True)
    payload = record(device, argv, plan=asdict(plan), measurements=[asdict(m) for m in measurements],
                     ratios=ratios(measurements), kernel=list(kernel_rows), **extra)
    with open(os.path.join(out_dir, 'benchmark.json'), 'w') as f:
        json.dump(payload, f, indent=2)
    payload['plot'] = plot_sweep(measurements, os.path.join(out_dir, 'benchmark.png'))
    return payload
