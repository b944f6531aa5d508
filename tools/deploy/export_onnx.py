#!/usr/bin/env python
"""Export an H-MaiT or MaiT model to ONNX and check it in ONNX Runtime or OpenVINO against PyTorch.

    python tools/deploy/export_onnx.py CONFIG_OR_MODEL [CHECKPOINT] --out FILE [--dynamic] [--opset N]
                                       [--shape H W] [--batch N] [--features] [--check-shapes HxW ...]
                                       [--masked-heads halo|openvino|openvino-bf16]
                                       [--runtime onnxruntime|openvino] [--precision f32|bf16]
                                       [--threads N] [--atol X] [--int8] [--data DIR [--num-images N]]

CONFIG_OR_MODEL is a timm model name (``hmait_tiny``; with ``--features`` its multi-scale maps), a
classification config, or a detection / segmentation config whose backbone is exported. By default
the graph holds standard ONNX operators only; ``--masked-heads openvino`` writes each masked-head
layer as one ``hmait.MaskedAttention`` node instead, which OpenVINO runs with the project's CPU kernel
(``openvino-bf16``: the node reads and writes bfloat16, for OpenVINO's bf16 inference precision).
``--dynamic`` keeps batch, height and width symbolic: one file for every input size. After
exporting, a random input goes through the runtime and PyTorch (at ``--shape``, and with
``--dynamic`` also at every ``--check-shapes`` size); the tool prints the largest difference and both
throughputs, and exits with status 1 when a difference exceeds --atol. The runtime is ONNX Runtime
for standard files and OpenVINO (with the extension) for files with the project's nodes;
``--precision`` is OpenVINO's inference precision.
``--int8`` also writes FILE with ``.onnx`` replaced by ``.int8.onnx``: ONNX Runtime's dynamic int8
quantization, checked the same way (its difference is reported, not held to --atol). ``--data``
(a classifier and an ImageNet-layout folder, ``val/`` when there is one) adds the top-1 accuracy of
PyTorch and of each file on its images, at --shape's height.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    from hmait.deploy import add_export_arguments, check_export_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_export_arguments(parser, out_help='the .onnx file to write',
                         shape_help='example input height and width (default 224 224)',
                         batch_help='example batch (default 1)', dynamic_help='symbolic batch, height and width')
    parser.add_argument('--opset', type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--masked-heads', default='halo', choices=('halo', 'openvino', 'openvino-bf16'),
                        help='halo: standard ONNX operators (default); openvino: one hmait.MaskedAttention node '
                             'per layer, run by OpenVINO with the project\'s extension; openvino-bf16: that node in '
                             'bfloat16, for OpenVINO\'s bf16 inference precision')
    parser.add_argument('--runtime', choices=('onnxruntime', 'openvino'),
                        help='runtime of the check (default: onnxruntime for halo, openvino otherwise)')
    parser.add_argument('--precision', choices=('f32', 'bf16'),
                        help="OpenVINO's inference precision (default: bf16 for --masked-heads openvino-bf16, "
                             'else f32)')
    parser.add_argument('--atol', type=float,
                        help='largest allowed difference (default 1e-3, and 3e-2 at OpenVINO precision bf16)')
    parser.add_argument('--int8', action='store_true', help="also write ONNX Runtime's dynamic int8 quantization")
    parser.add_argument('--data', help='ImageNet-layout folder: also report top-1 accuracy on its images')
    parser.add_argument('--num-images', type=int, default=1000, help='with --data, at most this many (default 1000)')
    args = parser.parse_args(argv)
    check_export_arguments(parser, args, positive=('batch', 'threads', 'opset', 'num_images'))
    if args.runtime is None:
        args.runtime = 'onnxruntime' if args.masked_heads == 'halo' else 'openvino'
    if args.runtime == 'onnxruntime' and args.masked_heads != 'halo':
        parser.error(f'--masked-heads {args.masked_heads} writes nodes only OpenVINO runs (with the project\'s '
                     'extension); check it with --runtime openvino')
    if args.precision is not None and args.runtime != 'openvino':
        parser.error('--precision is OpenVINO\'s inference precision; it needs --runtime openvino')
    if args.precision is None:
        args.precision = 'bf16' if args.masked_heads == 'openvino-bf16' else 'f32'
    if args.int8 and args.runtime != 'onnxruntime':
        parser.error('--int8 is ONNX Runtime\'s dynamic quantization; it needs --runtime onnxruntime and '
                     '--masked-heads halo')
    if args.atol is None:
        args.atol = 3e-2 if args.runtime == 'openvino' and args.precision == 'bf16' else 1e-3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from hmait.analysis.tooling import image_loader
    from hmait.deploy import (
        OpenVINOSession,
        check_against_torch,
        error_summary,
        export_example,
        export_model,
        export_onnx,
        onnxruntime_session,
        parse_shapes,
        quantize_int8,
        session_predictor,
        top1_accuracy,
    )

    try:
        extra = parse_shapes(args.check_shapes) if args.dynamic else []
        model = export_model(args)
        if args.data and (args.features or not getattr(model, 'num_classes', None)):
            what = f'{args.source} with --features' if args.features else f"{args.source}'s backbone"
            raise ValueError(f'--data measures top-1 accuracy and needs a classifier; {what} gives feature maps')
        loader = (image_loader(args.data, model, args.shape[0], args.num_images, args.batch)
                  if args.data else None)
    except (ValueError, FileNotFoundError) as err:
        print(f'export_onnx: error: {err}', file=sys.stderr)
        return 2
    out, gen, image = export_example(args, model)
    channels = image.shape[1]
    try:
        names = export_onnx(model, str(out), image, dynamic=args.dynamic, opset=args.opset,
                            masked_heads=args.masked_heads)
    except Exception as err:  # the exporter raises many types; the user needs the reason, not the trace
        print(f'export_onnx: error: torch.onnx.export of {args.source} failed: {error_summary(err)}\n'
              'It needs onnx and onnxscript (both in the lock); a model with soft masking exports its global '
              'attention, which is large at big inputs; try without --dynamic or another --opset.', file=sys.stderr)
        return 1
    data = out.with_name(out.name + '.data')  # the exporter keeps large weights beside the graph
    stored = f' and {data} ({data.stat().st_size / 2 ** 20:.1f} MiB, keep them together)' if data.is_file() else ''
    print(f'wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB){stored}, outputs {", ".join(names)}'
          + (', dynamic batch, height and width' if args.dynamic else ''))
    files = [('fp32', out)]
    if args.int8:
        stem = out.name[:-len('.onnx')] if out.name.endswith('.onnx') else out.name
        int8 = out.with_name(stem + '.int8.onnx')
        quantize_int8(str(out), str(int8))
        print(f'wrote {int8} (dynamic int8 quantization, {int8.stat().st_size / 2 ** 20:.1f} MiB)')
        files.append(('int8', int8))
    shapes = [(args.batch, *args.shape)] + [(args.batch, h, w) for h, w in extra]
    if args.runtime == 'openvino':
        runtime = f'OpenVINO {args.precision}'

        def open_session(path):
            return OpenVINOSession(str(path), args.precision, args.threads)
    else:
        runtime = 'ONNX Runtime'

        def open_session(path):
            return onnxruntime_session(str(path), args.threads)
    print(f'| file | input | max abs diff | PyTorch img/s | {runtime} img/s | {runtime} / PyTorch |')
    print('|---|---|---:|---:|---:|---:|')
    worst = 0.
    for kind, path in files:
        try:
            session = open_session(path)
        except (ImportError, RuntimeError) as err:
            print(f'export_onnx: error: {runtime} cannot run {path}: {err}', file=sys.stderr)
            return 1
        for b, h, w in shapes:
            check = check_against_torch(model, session, torch.randn(b, channels, h, w, generator=gen))
            if kind == 'fp32':
                worst = max(worst, check.max_abs_diff)
            print(f'| {kind} | {b}x{channels}x{h}x{w} | {check.cells()} |')
    if loader is not None:
        with torch.inference_mode():
            accuracy = [('PyTorch', top1_accuracy(model, loader))]
        for kind, path in files:
            predict = session_predictor(open_session(path), None if args.dynamic else args.batch)
            accuracy.append((f'{runtime} {kind}', top1_accuracy(predict, loader)))
        print(f'top-1 on {len(loader.dataset)} images of {args.data}: '
              + ', '.join(f'{name} {acc:.2f} %' for name, acc in accuracy))
    if worst > args.atol:
        print(f'export_onnx: error: {runtime} differs from PyTorch by {worst:.2e} > --atol {args.atol}',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
