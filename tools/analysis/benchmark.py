#!/usr/bin/env python
"""Throughput (images/s) and peak memory of H-MaiT and other timm models against timm's Swin, alternately.

    python tools/analysis/benchmark.py [--out-dir DIR] [--device cuda|cpu] [--models M ...]
                                       [--modes inference train] [--precisions fp32 bf16]
                                       [--runtimes eager compile onnxruntime openvino openvino-kernel aoti]
                                       [--batch N] [--resolution PX]
                                       [--sweep PX ...] [--sweep-inference PX ...] [--sweep-batch N]
                                       [--warmup N] [--iters N] [--reps N] [--threads N]
                                       [--attention-free] [--backbones BxCxHxW ...] [--backbone-arch tiny]
                                       [--backbone-global-attn pooled windowed full]

With a GPU and no options it runs the whole GPU table: H-MaiT-T/S and Swin-T/S, batch 64 at
224 px, inference and training, fp32 and bf16 autocast, eager and torch.compile, then a sweep
over 224..1024 px (2048 px for inference) at batch 8, then the masked-head kernel table. Without
a GPU the default is a small CPU run (tiny models, batch 8, fp32, eager, no sweep); options widen
it. ``onnxruntime`` exports both models and times ONNX Runtime (inference, fp32); ``openvino``
times OpenVINO on the same standard files (inference, fp32 and bf16 as its inference precision);
``openvino-kernel`` exports H-MaiT/MaiT with the project's masked-head nodes and runs them with the
project's OpenVINO extension (Swin as under ``openvino``); ``aoti`` compiles each model into an
AOTInductor package (inference, fp32; H-MaiT's masked heads as the C++ kernel's op).

Any timm model can be listed (``convnext_tiny``, ``deit_small_patch16_224``, ...): each is compared
with the Swin of its size (H-MaiT-T, ConvNeXt-T and DeiT-S with Swin-T), which the run adds when it
is not listed. ``--backbones 1x3x800x1344 2x3x512x512`` also times the detection/segmentation
backbones (``HMaiT`` with each span of its global heads in ``--backbone-global-attn`` against mmdet's
``SwinTransformer``, inference, in every ``--precisions``) at those input shapes, with their FLOP
ratio beside the time ratio; it needs mmdet.
``--attention-free`` adds ``hmait_tiny+attention-free`` beside ``hmait_tiny`` (and so on): the same
model with its attention layers reduced to their qkv and output projections, so its ratio against
Swin bounds what any change to H-MaiT's attention can win in that setting; with ``--backbones`` it
adds ``HMaiT+attention-free`` to the backbone comparison too.

Prints a markdown table with the H-MaiT / Swin ratios and every repetition, and writes
benchmark.json (hardware, versions, command, every repetition) and, for a sweep, benchmark.png.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out-dir', default='work_dirs/benchmark', help='where the JSON and PNG go')
    parser.add_argument('--device', choices=('cuda', 'cpu'), help='default: cuda when available')
    parser.add_argument('--models', nargs='+',
                        help='timm model names (default: H-MaiT-T/S and Swin-T/S on GPU, the tiny pair on CPU)')
    parser.add_argument('--modes', nargs='+', choices=('inference', 'train'))
    parser.add_argument('--precisions', nargs='+', choices=('fp32', 'bf16'), help='bf16 = autocast')
    parser.add_argument('--runtimes', nargs='+',
                        choices=('eager', 'compile', 'onnxruntime', 'openvino', 'openvino-kernel', 'aoti'),
                        help='eager PyTorch, torch.compile, ONNX Runtime / OpenVINO on the exported model '
                             '(openvino-kernel: H-MaiT with its masked heads as the project\'s OpenVINO nodes), or '
                             'an AOTInductor package (aoti)')
    parser.add_argument('--batch', type=int)
    parser.add_argument('--resolution', type=int, help='resolution of the main comparison (default 224)')
    parser.add_argument('--sweep', nargs='*', type=int, dest='sweep_resolutions', metavar='PX',
                        help='resolutions of the sweep (inference and training); give no value for none')
    parser.add_argument('--sweep-inference', nargs='*', type=int, dest='sweep_inference_only', metavar='PX',
                        help='extra sweep resolutions for inference only (GPU default: 2048)')
    parser.add_argument('--sweep-batch', type=int)
    parser.add_argument('--sweep-modes', nargs='+', choices=('inference', 'train'))
    parser.add_argument('--warmup', type=int, help='warm-up iterations per model and setting')
    parser.add_argument('--iters', type=int, help='timed iterations per repetition')
    parser.add_argument('--reps', type=int, help='repetitions; models alternate within each')
    parser.add_argument('--kernel', action=argparse.BooleanOptionalAction, default=None,
                        help='also time the masked-head kernels at stage-1 shapes against the PyTorch '
                        'path and report memory bandwidth (CUDA only; on by default there)')
    parser.add_argument('--threads', type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument('--attention-free', action='store_true', default=None,
                        help='also time each H-MaiT/MaiT model with its attention reduced to the qkv and output '
                             'projections: about the most any change to its attention could gain')
    parser.add_argument('--backbones', nargs='+', metavar='BxCxHxW',
                        help="also time HMaiT against mmdet's SwinTransformer at these input shapes")
    parser.add_argument('--backbone-arch', default='tiny', choices=('tiny', 'small', 'base'),
                        help='size of the backbone comparison (default: tiny)')
    parser.add_argument('--backbone-global-attn', nargs='+', default=['pooled', 'windowed', 'full'],
                        choices=('full', 'pooled', 'windowed'),
                        help="spans of HMaiT's global heads to time (HMaiT's global_attn; default: all three, "
                             "'full' being the paper's)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from dataclasses import asdict

    import torch

    from hmait.benchmark.attention import kernel_bandwidth, kernel_table, peak_bandwidth_gbs
    from hmait.benchmark.backbones import backbone_ratios, backbone_table, measure_backbones, parse_shape
    from hmait.benchmark.measure import hardware_line
    from hmait.benchmark.models import default_plan, run_benchmark, table, write_report

    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device is available; use --device cpu')
    if args.threads is not None:
        if args.threads <= 0:
            raise SystemExit(f'--threads must be a positive integer, got {args.threads}')
        torch.set_num_threads(args.threads)
    plan = default_plan(device)
    for name in ('models', 'modes', 'precisions', 'runtimes', 'batch', 'resolution', 'sweep_resolutions',
                 'sweep_inference_only', 'sweep_batch', 'sweep_modes', 'warmup', 'iters', 'reps', 'kernel',
                 'attention_free'):
        value = getattr(args, name)
        if value is not None:
            setattr(plan, name, value)
    if plan.kernel and device.type != 'cuda':
        raise SystemExit('--kernel: the kernel timing needs a CUDA device')
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        shapes = [parse_shape(text) for text in args.backbones or ()]
        measurements = run_benchmark(plan, device, log=log)
    except ValueError as exc:
        raise SystemExit(f'benchmark: {exc}') from None
    backbone_rows = []
    if shapes:
        backbone_rows = measure_backbones(shapes, plan.precisions, args.backbone_arch, warmup=plan.warmup,
                                          iters=plan.iters, reps=plan.reps, device=device,
                                          global_attns=args.backbone_global_attn,
                                          attention_free=bool(args.attention_free), log=log)
    kernel_rows = []
    if plan.kernel:
        log('masked-head kernels at stage-1 shapes (batch 64, 3 heads, 56x56, d 32)')
        kernel_rows = kernel_bandwidth(device)
    argv = sys.argv if argv is None else ['tools/analysis/benchmark.py', *argv]
    payload = write_report(measurements, plan, device, args.out_dir, argv, kernel_rows,
                           backbones=[asdict(r) for r in backbone_rows], backbone_ratios=backbone_ratios(backbone_rows))
    print(f"\n{hardware_line(payload['hardware'])}; peak memory: allocated during one iteration beyond what was "
          f"allocated before it\n")
    print(table(measurements))
    if backbone_rows:
        print(f"\nDetection/segmentation backbones ({args.backbone_arch}), inference; FLOPs: multiply-accumulates "
              f"at the input shape, attention counted analytically for HMaiT\n")
        print(backbone_table(backbone_rows))
    if kernel_rows:
        peak = peak_bandwidth_gbs(device)
        print(f"\nMasked-head layer, hard mode; peak bandwidth {f'{peak:.0f} GB/s' if peak else 'unknown'}\n")
        print(kernel_table(kernel_rows))
    plot = f' and {args.out_dir}/benchmark.png' if payload['plot'] else ''
    print(f'\nwrote {args.out_dir}/benchmark.json{plot}')


if __name__ == '__main__':
    main()
