#!/usr/bin/env python
"""Compile an H-MaiT or MaiT model into an AOTInductor package and check it against PyTorch.

    python tools/deploy/export_aoti.py CONFIG_OR_MODEL [CHECKPOINT] --out FILE.pt2 [--batch N] [--dynamic]
                                       [--shape H W] [--check-shapes HxW ...] [--features] [--threads N]
                                       [--atol X]

CONFIG_OR_MODEL is a timm model name, a classification config, or a detection / segmentation config
whose backbone is compiled (as for export_onnx.py). ``torch.export`` keeps the masked heads as the
project's C++ kernel op, which the package calls through torch's dispatcher, and AOTInductor compiles
the rest (a C++ compiler is needed; minutes for a full-size model on 2 cores). The package is tied
to this torch version and the CPU architecture. Without --dynamic it is also tied to the input shape
(--batch and --shape); with --dynamic, batch, height and width stay symbolic (height and width any
multiple of 32, as mmdet and mmseg pad their inputs), and the check also runs at every --check-shapes
size. After compiling, a random input goes through the package and PyTorch; the tool prints the
largest difference and both throughputs, and exits with status 1 when a difference exceeds --atol.
Load it with ``hmait.deploy.AOTISession(path)`` (which refuses an input shape the package does not
take) or, after loading the kernel, ``torch._inductor.aoti_load_package``.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    from hmait.deploy import AOTI_SIDE_MULTIPLE, add_export_arguments, check_export_arguments, parse_shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_export_arguments(parser, out_help='the .pt2 package to write',
                         shape_help='input height and width the package is compiled for (default 224 224)',
                         batch_help='batch the package is compiled for (default 1)',
                         dynamic_help=f'symbolic batch, height and width (multiples of {AOTI_SIDE_MULTIPLE})')
    parser.add_argument('--atol', type=float, default=1e-3, help='largest allowed difference (default 1e-3)')
    args = parser.parse_args(argv)
    check_export_arguments(parser, args)
    if not args.out.endswith('.pt2'):
        parser.error(f'--out must name a .pt2 file (an AOTInductor package), got {args.out!r}')
    try:
        args.extra_shapes = parse_shapes(args.check_shapes) if args.dynamic else []
    except ValueError as err:
        parser.error(f'--check-shapes: {err}')
    if args.dynamic:
        for h, w in [tuple(args.shape)] + args.extra_shapes:
            if h % AOTI_SIDE_MULTIPLE or w % AOTI_SIDE_MULTIPLE:
                parser.error(f'a --dynamic package takes heights and widths that are multiples of '
                             f'{AOTI_SIDE_MULTIPLE}; --shape and --check-shapes hold {h}x{w}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from hmait.deploy import AOTISession, check_against_torch, error_summary, export_aoti, export_example, export_model

    try:
        model = export_model(args)
    except (ValueError, FileNotFoundError) as err:
        print(f'export_aoti: error: {err}', file=sys.stderr)
        return 2
    out, gen, image = export_example(args, model)
    try:
        export_aoti(model, str(out), image, dynamic=args.dynamic)
        session = AOTISession(str(out))
    except Exception as err:  # export and compilation raise many types; the user needs the reason
        print(f'export_aoti: error: compiling {args.source} failed: {error_summary(err)}', file=sys.stderr)
        return 1
    fixed = 'dynamic batch, height and width' if args.dynamic else f'input {"x".join(map(str, image.shape))}'
    print(f'wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB), {fixed}, torch {torch.__version__}')
    print('| input | max abs diff | PyTorch img/s | package img/s | package / PyTorch |')
    print('|---|---:|---:|---:|---:|')
    worst = 0.
    for h, w in [tuple(args.shape)] + args.extra_shapes:
        check = check_against_torch(model, session, torch.randn(args.batch, image.shape[1], h, w, generator=gen))
        worst = max(worst, check.max_abs_diff)
        print(f'| {"x".join(map(str, check.shape))} | {check.cells()} |')
    if worst > args.atol:
        print(f'export_aoti: error: the package differs from PyTorch by {worst:.2e} > --atol {args.atol}',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
