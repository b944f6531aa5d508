#!/usr/bin/env python
"""Compile an H-MaiT or MaiT model into an AOTInductor package and check it against PyTorch.

    python tools/deploy/export_aoti.py CONFIG_OR_MODEL [CHECKPOINT] --out FILE.pt2 [--batch N]
                                       [--shape H W] [--features] [--threads N] [--atol X]

CONFIG_OR_MODEL is a timm model name, a classification config, or a detection / segmentation config
whose backbone is compiled (as for export_onnx.py). ``torch.export`` keeps the masked heads as the
project's C++ kernel op, which the package calls through torch's dispatcher, and AOTInductor compiles
the rest (a C++ compiler is needed; minutes for a full-size model on 2 cores). The package is tied
to this torch version, the CPU architecture and the input shape (--batch and --shape): the kernel op
takes a static grid, so there is no dynamic-shape package yet. After compiling, a random input goes
through the package and PyTorch; the tool prints the largest difference and both throughputs, and
exits with status 1 when the difference exceeds --atol. Load it with
``hmait.deploy.AOTISession(path)`` or, after loading the kernel, ``torch._inductor.aoti_load_package``.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    from hmait.deploy import add_export_arguments, check_export_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_export_arguments(parser, out_help='the .pt2 package to write',
                         shape_help='input height and width the package is compiled for (default 224 224)',
                         batch_help='batch the package is compiled for (default 1)')
    parser.add_argument('--atol', type=float, default=1e-3, help='largest allowed difference (default 1e-3)')
    args = parser.parse_args(argv)
    check_export_arguments(parser, args)
    if not args.out.endswith('.pt2'):
        parser.error(f'--out must name a .pt2 file (an AOTInductor package), got {args.out!r}')
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
        export_aoti(model, str(out), image)
        session = AOTISession(str(out))
    except Exception as err:  # export and compilation raise many types; the user needs the reason
        print(f'export_aoti: error: compiling {args.source} failed: {error_summary(err)}', file=sys.stderr)
        return 1
    print(f'wrote {out} ({out.stat().st_size / 2 ** 20:.1f} MiB), input {"x".join(map(str, image.shape))}, '
          f'torch {torch.__version__}')
    check = check_against_torch(model, session, torch.randn(*image.shape, generator=gen))
    print('| input | max abs diff | PyTorch img/s | package img/s | package / PyTorch |')
    print('|---|---:|---:|---:|---:|')
    print(f'| {"x".join(map(str, check.shape))} | {check.cells()} |')
    if check.max_abs_diff > args.atol:
        print(f'export_aoti: error: the package differs from PyTorch by {check.max_abs_diff:.2e} > --atol {args.atol}',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
