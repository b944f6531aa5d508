"""The benchmarking pieces: one timer, one memory measure, one hardware record, one table writer,
and the two benchmarks built on them, each run on tiny inputs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmait.benchmark.attention import PATHS, _call, benchmark_attention, path_fn, summarise
from hmait.benchmark.measure import (
    ALLOCATOR_VARIABLES,
    hardware_line,
    hardware_record,
    markdown_table,
    peak_memory_mib,
    record,
    time_alternating,
)
from hmait.benchmark.models import BenchmarkPlan, Measurement, Setting, default_plan, measure_setting, ratios, table
from hmait.ops.masked_attention import qkv_heads

REPO = Path(__file__).resolve().parents[1]


def test_timer_alternates_warms_up_and_averages_iterations():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ('a', 'b')}
    times, errors = time_alternating(fns, reps=2, iters=3, warmup=1)
    assert errors == {}
    # One warm-up call each, then per repetition 3 calls of a, then 3 of b.
    assert calls == ['a', 'b'] + (['a'] * 3 + ['b'] * 3) * 2
    assert {name: len(t) for name, t in times.items()} == {'a': 2, 'b': 2}


def test_timer_measures_seconds_per_call_and_drops_a_failing_callable():
    def fail():
        raise RuntimeError('no kernel for this shape')

    times, errors = time_alternating({'sleep': lambda: time.sleep(0.02), 'fail': fail}, reps=2, iters=2, warmup=0)
    assert errors == {'fail': 'RuntimeError: no kernel for this shape'}
    assert set(times) == {'sleep'}
    assert all(0.02 <= t < 0.5 for t in times['sleep'])
    with pytest.raises(ValueError, match='reps and iters must be positive'):
        time_alternating({'sleep': lambda: None}, reps=0)


def test_peak_memory_is_the_peak_not_the_total():
    mib = 2 ** 20 // 4  # float32 elements in one MiB

    def one_block():
        return torch.ones(4 * mib)

    def two_blocks_in_turn():
        for _ in range(2):
            torch.ones(4 * mib).sum()

    def two_blocks_at_once():
        a, b = torch.ones(4 * mib), torch.ones(4 * mib)
        return a, b

    assert 4 <= peak_memory_mib(one_block) < 5
    assert 4 <= peak_memory_mib(two_blocks_in_turn) < 5
    assert 8 <= peak_memory_mib(two_blocks_at_once) < 9


def test_peak_memory_leaves_stderr_to_the_user():
    """torch's profiler library, started for the CPU memory peak, prints nothing of its own."""
    env = {k: v for k, v in os.environ.items() if k != 'KINETO_LOG_LEVEL'}
    code = ('from hmait.benchmark.measure import peak_memory_mib; import torch; '
            'print(peak_memory_mib(lambda: torch.ones(2 ** 20)))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env={**env, 'PYTHONPATH': str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 3.9 < float(proc.stdout) < 4.1
    assert 'gpuGetDeviceCount' not in proc.stderr and 'profiler_start' not in proc.stderr, proc.stderr


def test_peak_memory_of_a_tiny_model_excludes_its_weights():
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    x = torch.randn(64, 256)
    weights_mib = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    with torch.no_grad():
        peak = peak_memory_mib(lambda: model(x))
    activations_mib = 64 * 1024 * 4 / 2 ** 20
    assert activations_mib <= peak < weights_mib + activations_mib


def test_hardware_record_and_payload_head():
    info = hardware_record('cpu')
    assert info['torch'] == torch.__version__ and info['cpu_cores'] >= 1 and info['torch_threads'] >= 1
    assert info['cpu']
    payload = record('cpu', ['tools/x.py', '--flag'], rows=[1])
    assert payload['command'].endswith('tools/x.py --flag') and payload['rows'] == [1]
    assert payload['hardware']['torch'] == torch.__version__


def test_hardware_record_names_the_allocator_settings(monkeypatch):
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    info = hardware_record('cpu')
    assert info['allocator'] == 'default' and info['libc']
    assert 'allocator' not in hardware_line(info)
    monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.trim_threshold=1073741824')
    info = hardware_record('cpu')
    assert info['allocator'] == {'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=1073741824'}
    assert hardware_line(info).endswith('allocator GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824')


def test_markdown_table_formats_and_aligns():
    text = markdown_table([('name', 'name'), ('ms', 'ms:'), ('x', 'x:')],
                          [dict(name='a', ms=12.345, x=None), dict(name='b', ms=0.01234, x=3)])
    assert text.splitlines() == ['| name | ms | x |', '|---|---:|---:|', '| a | 12.35 | - |', '| b | 0.0123 | 3 |']


def test_ratios_pair_hmait_with_its_swin_in_the_same_setting():
    common = dict(mode='inference', precision='fp32', runtime='eager', resolution=224, batch=8)
    # Repetition 2 was slowed down for both models alike: its paired ratio stays at 1.5,
    # while the ratio of the medians (30 / 12) does not see the pairing.
    ms = [Measurement('hmait_tiny', **common, images_per_s=30., peak_memory_mib=90.,
                      repetitions_images_per_s=[30., 15., 32.]),
          Measurement('swin_tiny_patch4_window7_224', **common, images_per_s=12., peak_memory_mib=100.,
                      repetitions_images_per_s=[20., 10., 12.]),
          Measurement('hmait_tiny', **dict(common, batch=1), images_per_s=5.)]
    (row,) = ratios(ms)
    assert row['throughput_ratio'] == pytest.approx(2.5) and row['memory_ratio'] == pytest.approx(0.9)
    assert row['repetition_ratios'] == pytest.approx([1.5, 1.5, 32 / 12])
    assert row['paired_ratio'] == pytest.approx(1.5) and row['paired_ratio_range'] == '1.50-2.67'
    assert '| 2.50 | 1.50 | 1.50-2.67 | 0.90 |' in table(ms)


def test_measure_setting_on_a_real_model_and_an_unknown_name():
    torch.manual_seed(0)
    setting = Setting('train', 'fp32', 'eager', resolution=64, batch=2)
    hmait, unknown = measure_setting(['hmait_tiny', 'no_such_model'], setting, torch.device('cpu'), warmup=0,
                                     iters=1, reps=2)
    assert hmait.error is None and len(hmait.repetitions_images_per_s) == 2
    assert hmait.images_per_s == pytest.approx(2 / (hmait.ms_per_iter / 1e3))
    assert hmait.peak_memory_mib > 1
    assert unknown.images_per_s is None and "'no_such_model' is not a timm model" in unknown.error


def test_plan_rejects_what_cannot_run():
    plan = default_plan(torch.device('cpu'))
    assert plan.settings() and all(s.runtime == 'eager' for s in plan.settings())
    bad = BenchmarkPlan(**{**plan.__dict__, 'modes': ['train'], 'runtimes': ['onnxruntime']})
    with pytest.raises(ValueError, match='exported runtimes run inference only, onnxruntime and aoti in fp32 only'):
        bad.validate()
    with pytest.raises(ValueError, match='multiples of 32'):
        BenchmarkPlan(**{**plan.__dict__, 'resolution': 100}).validate()


def test_attention_benchmark_rows_and_summary():
    lines = []
    rows = benchmark_attention([4, 8], ['hard', 'hard-torch', 'dense-hard'], repeats=2, warmup=0,
                               max_quadratic_tokens=16, log=lines.append)
    assert len(rows) == 2 * 3 * 2
    assert [(r['grid'], r['passes']) for r in rows] == [(g, p) for g in (4, 8) for p in ('fwd', 'fwd+bwd')
                                                       for _ in range(3)]
    # Both grids are timed in every repetition, alternately.
    reps = [line for line in lines if 'rep ' in line]
    assert len(reps) == 4 and all('4x4 hard ' in line and '8x8 hard ' in line for line in reps)
    done = [r for r in rows if r['ms'] is not None]
    skipped = [r for r in rows if r['ms'] is None]
    assert all(r['path'] == 'dense-hard' and r['grid'] == 8 and 'skipped' in r['note'] for r in skipped)
    assert len(skipped) == 2 and all(r['peak_mib'] > 0 and len(r['repetitions_ms']) == 2 for r in done)
    summary = summarise(rows)
    assert 'hard fwd+bwd: t(8^2) / t(4^2)' in summary
    assert summary['hard fwd at 8^2: speed-up over hard-torch'] > 0


def test_attention_summary_pairs_growth_by_repetition():
    def row(grid, ms):
        return dict(grid=grid, path='hard', passes='fwd', ms=sorted(ms)[len(ms) // 2], repetitions_ms=ms)
    summary = summarise([row(4, [1., 2., 4.]), row(8, [4., 6., 20.])])
    assert summary['hard fwd: t(8^2) / t(4^2)'] == pytest.approx(3.)  # medians 6 / 2
    assert summary['hard fwd: t(8^2) / t(4^2), median per repetition'] == pytest.approx(4.)  # of 4, 3, 5
    unpaired = summarise([row(4, [1., 2., 4.]), row(8, [4., 6.])])
    assert 'hard fwd: t(8^2) / t(4^2), median per repetition' not in unpaired


def test_attention_benchmark_packed_layout_runs_the_same_attention(monkeypatch):
    """The packed layout hands every path one (B, N, 3, heads, d) qkv and gets (B, N, heads, d) back:
    the same values as the separate layout, and its backward reaches qkv."""
    qkv = torch.randn(2, 16, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv_heads(qkv)
    alpha = torch.full((2,), 0.5, dtype=torch.float64)
    for path in PATHS:
        if path == 'global-cpu':  # float64, head size 8: not the kernel's (tested below)
            continue
        packed = path_fn(path, (4, 4), 3, 'packed')(qkv, alpha)
        separate = path_fn(path, (4, 4), 3)(q, k, v, alpha)
        assert packed.shape == (2, 16, 2, 8), path
        torch.testing.assert_close(packed, separate.transpose(1, 2), msg=path)
    real_grad = torch.autograd.grad
    differentiated = []
    monkeypatch.setattr(torch.autograd, 'grad', lambda out, inputs, g: differentiated.append(inputs)
                        or real_grad(out, inputs, g))
    _call(path_fn('hard', (4, 4), 3, 'packed'), [qkv, alpha], backward=True)()
    assert len(differentiated) == 1 and len(differentiated[0]) == 1 and differentiated[0][0] is qkv
    monkeypatch.undo()
    rows = benchmark_attention([4], ['hard', 'hard-torch'], repeats=1, warmup=0, layout='packed')
    assert len(rows) == 4 and all(r['ms'] > 0 and r['peak_mib'] > 0 for r in rows)
    with pytest.raises(ValueError, match="layout must be one of .*, got 'bnhd'"):
        benchmark_attention([4], ['hard'], layout='bnhd')


def test_attention_benchmark_times_each_kernel_instruction_set_alternately():
    from hmait.ops import cpu_kernel

    if not cpu_kernel.is_available():
        pytest.skip(f'CPU kernel unavailable: {cpu_kernel.cpu_kernel_status()[1]}')
    best = cpu_kernel.kernel_isa('best')
    lines = []
    rows = benchmark_attention([4], ['hard', 'hard-torch'], repeats=2, warmup=0, kernel_isas=['default', best],
                               log=lines.append)
    paths = [r['path'] for r in rows if r['passes'] == 'fwd']
    assert paths == ['hard@default', f'hard@{best}', 'hard-torch']
    assert all(r['ms'] > 0 for r in rows)
    assert all('4x4 hard@default ' in line and f'4x4 hard@{best} ' in line for line in lines if 'rep ' in line)
    assert cpu_kernel.kernel_isa() == best  # the automatic choice is back after the run
    # Each call runs with its own variant selected.
    seen = []
    real = path_fn('hard', (4, 4), 3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr('hmait.benchmark.attention.path_fn',
                      lambda *a: lambda *t: seen.append(cpu_kernel.kernel_isa()) or real(*t))
        benchmark_attention([4], ['hard'], repeats=1, warmup=0, kernel_isas=['default'])
    assert seen and set(seen) == {'default'}
    with pytest.raises(ValueError, match='needs device cpu and a path of'):
        benchmark_attention([4], ['hard-torch'], kernel_isas=['default'])
    with pytest.raises(ValueError, match="'sse9' cannot run here"):
        benchmark_attention([4], ['hard'], kernel_isas=['sse9'])
    assert cpu_kernel.kernel_isa() == best


def test_attention_benchmark_times_the_global_kernel():
    from hmait.ops import cpu_kernel

    if not cpu_kernel.is_available():
        pytest.skip(f'CPU kernel unavailable: {cpu_kernel.cpu_kernel_status()[1]}')
    rows = benchmark_attention([4], ['global-cpu', 'global-matmul'], heads=2, head_dim=32, repeats=1, warmup=0)
    assert len(rows) == 4 and all(r['ms'] > 0 and not r['note'] for r in rows)
    qkv = torch.randn(1, 16, 3, 2, 32)
    torch.testing.assert_close(path_fn('global-cpu', (4, 4), 3, 'packed')(qkv, None),
                               path_fn('global-matmul', (4, 4), 3, 'packed')(qkv, None))


def test_attention_call_makes_the_output_gradient_once(monkeypatch):
    made = []
    real_ones_like = torch.ones_like
    monkeypatch.setattr(torch, 'ones_like', lambda t: made.append(t.shape) or real_ones_like(t))
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    calls = []
    fn = lambda *args: calls.append(1) or path_fn('hard-torch', (4, 4), 3)(*args)  # noqa: E731
    run = _call(fn, [q, k, v, None], backward=True)
    for _ in range(3):
        run()
    assert len(calls) == 3 and made == [torch.Size([1, 2, 16, 8])]


def test_attention_tool_writes_json_with_command_and_hardware(tmp_path):
    out = tmp_path / 'attention.json'
    proc = subprocess.run([sys.executable, 'tools/analysis/benchmark_attention.py', '--grids', '4', '--paths', 'hard',
                           'hard-torch', '--repeats', '1', '--threads', '1', '--layout', 'packed', '--out', str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.read_text())
    assert 'benchmark_attention.py --grids 4' in payload['command']
    assert payload['hardware']['torch_threads'] == 1 and payload['settings']['layout'] == 'packed'
    assert '| 4x4 | 16 | hard | fwd |' in proc.stdout and 'packed layout' in proc.stdout
    bad = subprocess.run([sys.executable, 'tools/analysis/benchmark_attention.py', '--batch', '0'], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and '--batch must be positive, got 0' in bad.stderr


def test_any_timm_model_runs_against_the_swin_of_its_size():
    """ConvNeXt takes no img_size and DeiT a fixed one: both are built as timm builds them, and each
    is compared with Swin-T, which the run adds."""
    from hmait.benchmark.models import BenchmarkPlan, reference_swin, run_benchmark, with_references
    swin_t = 'swin_tiny_patch4_window7_224'
    assert [reference_swin(n) for n in ('hmait_tiny', 'convnext_tiny', 'deit_small_patch16_224', 'convnext_small',
                                        swin_t, 'resnet50')] == [swin_t, swin_t, swin_t,
                                                                 'swin_small_patch4_window7_224', None, None]
    assert with_references(['convnext_tiny', 'hmait_small']) == ['convnext_tiny', 'hmait_small', swin_t,
                                                                 'swin_small_patch4_window7_224']
    plan = BenchmarkPlan(models=['convnext_tiny', 'deit_small_patch16_224'], modes=['inference'], precisions=['fp32'],
                         runtimes=['eager'], batch=1, resolution=64, sweep_resolutions=[], sweep_inference_only=[],
                         sweep_batch=1, sweep_modes=['inference'], warmup=0, iters=1, reps=2)
    measurements = run_benchmark(plan, torch.device('cpu'))
    assert [m.model for m in measurements] == ['convnext_tiny', 'deit_small_patch16_224', swin_t]
    assert all(m.error is None and m.images_per_s > 0 for m in measurements), [m.error for m in measurements]
    rows = ratios(measurements)
    assert [(r['model'], r['swin']) for r in rows] == [('convnext_tiny', swin_t), ('deit_small_patch16_224', swin_t)]
    with pytest.raises(ValueError, match="model 'convnext_tinyy' is not a timm model; similar: .*convnext_tiny"):
        BenchmarkPlan(**{**plan.__dict__, 'models': ['convnext_tinyy']}).validate()


def test_backbone_comparison_times_both_and_counts_their_flops():
    pytest.importorskip('mmdet')
    from hmait.benchmark.backbones import backbone_ratios, backbone_table, measure_backbones, parse_shape
    assert parse_shape('1x3x800x1344') == (1, 3, 800, 1344)
    with pytest.raises(ValueError, match="backbone shape '800x1344' must be BATCHxCHANNELSxHEIGHTxWIDTH"):
        parse_shape('800x1344')
    rows = measure_backbones([(1, 3, 96, 128)], ['fp32'], warmup=0, iters=1, reps=2,
                             global_attns=['pooled', 'full'], attention_free=True)
    assert [(r.backbone, r.global_attn) for r in rows] == [
        ('SwinTransformer', None), ('HMaiT', 'pooled'), ('HMaiT', 'full'), ('HMaiT+attention-free', None)]
    assert all(r.error is None and len(r.repetitions_ms) == 2 for r in rows)
    assert all(r.gflops > 0.1 for r in rows[:3]) and rows[3].gflops is None
    # 96x128 is below the 224-px grid in every stage: the pooled heads are the paper's, the same FLOPs.
    assert rows[1].gflops == rows[2].gflops
    ratios = backbone_ratios(rows)
    assert [(r['global_attn'], r['flop_ratio'] is None) for r in ratios] == [('pooled', False), ('full', False),
                                                                           (None, True)]
    assert ratios[0]['flop_ratio'] == pytest.approx(rows[1].gflops / rows[0].gflops)
    assert ratios[0]['throughput_ratio'] == pytest.approx(rows[0].ms_per_iter / rows[1].ms_per_iter)
    table = backbone_table(rows)
    for label in ('| SwinTransformer (tiny) | 1x3x96x128 | fp32 |', '| HMaiT pooled (tiny) | 1x3x96x128 | fp32 |',
                  '| HMaiT full (tiny) |', '| HMaiT+attention-free (tiny) |'):
        assert label in table
    with pytest.raises(ValueError, match="global_attns must be a non-empty list of"):
        measure_backbones([(1, 3, 96, 128)], global_attns=['local'])


def test_attention_free_variant_keeps_the_projections_and_mixes_no_tokens():
    """The bound on what attention work can win: the same model, every attention layer reduced to
    proj(value projection). Each token's output then depends on that token alone."""
    import timm

    from hmait.benchmark.models import build_model, check_models, without_token_mixing
    from hmait.models.layers import MaskedMultiheadAttention
    torch.manual_seed(0)
    model = build_model('hmait_tiny+attention-free', 64, torch.device('cpu')).eval()
    layers = [m for m in model.modules() if isinstance(m, MaskedMultiheadAttention)]
    assert len(layers) == 12
    layer, x = layers[0], torch.randn(2, 16 * 16, 96)
    value = layer.qkv(x)[..., 2 * 96:]
    torch.testing.assert_close(layer(x, (16, 16)), layer.proj(value))
    # No mixing: changing one token leaves every other token's output as it was.
    y = x.clone()
    y[:, 5] += 1.
    out_x, out_y = layer(x, (16, 16)), layer(y, (16, 16))
    assert torch.equal(out_x[:, :5], out_y[:, :5]) and torch.equal(out_x[:, 6:], out_y[:, 6:])
    assert not torch.allclose(out_x[:, 5], out_y[:, 5])
    # The real model differs, and the variant still trains its qkv and output projections.
    reference = timm.create_model('hmait_tiny', num_classes=1000).eval()
    reference.load_state_dict(model.state_dict())
    images = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(model(images), reference(images))
    model.train()(images).sum().backward()
    assert layer.qkv.weight.grad[2 * 96:].abs().sum() > 0 and layer.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='exists only for hmait_\\*, mait_\\* models'):
        check_models(['swin_tiny_patch4_window7_224+attention-free'])
    with pytest.raises(ValueError, match='Linear has no MaskedMultiheadAttention layer'):
        without_token_mixing(torch.nn.Linear(2, 2))


def test_attention_free_runs_beside_its_model_against_the_same_swin():
    from hmait.benchmark.models import BenchmarkPlan, run_benchmark, with_attention_free
    swin_t = 'swin_tiny_patch4_window7_224'
    assert with_attention_free(['mait_xtiny', 'hmait_tiny', swin_t]) == [
        'mait_xtiny', 'mait_xtiny+attention-free', 'hmait_tiny', 'hmait_tiny+attention-free', swin_t]
    # A variant listed by name gets no second suffix, and its model is not added twice.
    assert with_attention_free(['hmait_tiny+attention-free', swin_t]) == ['hmait_tiny+attention-free', swin_t]
    assert with_attention_free(['hmait_tiny', 'hmait_tiny+attention-free']) == ['hmait_tiny',
                                                                                'hmait_tiny+attention-free']
    plan = BenchmarkPlan(models=['hmait_tiny'], modes=['inference'], precisions=['fp32'], runtimes=['eager'],
                         batch=1, resolution=64, sweep_resolutions=[], sweep_inference_only=[], sweep_batch=1,
                         sweep_modes=['inference'], warmup=0, iters=1, reps=2, attention_free=True)
    measurements = run_benchmark(plan, torch.device('cpu'))
    assert [m.model for m in measurements] == ['hmait_tiny', 'hmait_tiny+attention-free', swin_t]
    assert all(m.error is None and m.images_per_s > 0 for m in measurements), [m.error for m in measurements]
    assert [(r['model'], r['swin']) for r in ratios(measurements)] == [
        ('hmait_tiny', swin_t), ('hmait_tiny+attention-free', swin_t)]
    assert '| hmait_tiny+attention-free | inference | fp32 | eager |' in table(measurements)
