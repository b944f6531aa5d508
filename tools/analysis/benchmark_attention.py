#!/usr/bin/env python
"""Benchmark the masked-attention op: every path against the portable path, the dense reference and SDPA.

    python tools/analysis/benchmark_attention.py [--grids 28 56 112 224] [--batch 1] [--threads N]
                                                 [--layout heads|packed] [--kernel-isas ISA ...]
                                                 [--out FILE.json]

Prints a markdown table (median and every repetition), the growth per grid step and the speed-up
of each path over the portable PyTorch path, and writes JSON with the hardware and the command.
All grids and paths of a pass are timed alternately within each repetition, so the growth is also
given as the median of its per-repetition values, which drift on a shared machine moves least.
``--layout packed`` times every path on one (B, N, 3, heads, d) qkv tensor, the layout a model's
attention layer hands over, instead of separate (B, heads, N, d) q, k and v.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    import torch

    from hmait.benchmark.attention import LAYOUTS, PATHS, benchmark_attention, summarise, table
    from hmait.benchmark.measure import hardware_line, record

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--grids', type=int, nargs='+', default=[28, 56, 112, 224], help='grid sides')
    parser.add_argument('--paths', nargs='+', default=list(PATHS), choices=PATHS)
    parser.add_argument('--layout', default='heads', choices=LAYOUTS,
                        help='separate (B, heads, N, d) q, k, v, or one packed (B, N, 3, heads, d) qkv')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--heads', type=int, default=3)
    parser.add_argument('--head-dim', type=int, default=32)
    parser.add_argument('--mask-size', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', choices=['cuda', 'cpu'])
    parser.add_argument('--threads', type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument('--max-quadratic-tokens', type=int, default=112 * 112,
                        help='skip the O(N^2) paths (soft, dense, SDPA, global matmuls) above this many tokens')
    parser.add_argument('--kernel-isas', nargs='+', default=[], choices=('default', 'avx2', 'avx512', 'avx512_bf16'),
                        help='time the hard and strict paths once per instruction-set variant of the CPU kernel, '
                             'alternately (paths hard@avx512 and so on)')
    parser.add_argument('--out', default='work_dirs/benchmark_attention.json', help='JSON output path')
    args = parser.parse_args(argv)
    for name in ('batch', 'heads', 'head_dim', 'repeats', 'threads'):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f'--{name.replace("_", "-")} must be positive, got {value}')
    if any(g <= 0 for g in args.grids):
        parser.error(f'--grids must be positive grid sides, got {args.grids}')
    if args.threads:
        torch.set_num_threads(args.threads)

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        rows = benchmark_attention(args.grids, args.paths, args.batch, args.heads, args.head_dim, args.mask_size,
                                   args.repeats, args.warmup, getattr(torch, args.dtype), args.device,
                                   args.max_quadratic_tokens, args.layout, log=log, kernel_isas=args.kernel_isas)
    except ValueError as err:  # an instruction-set variant this machine cannot run, or no kernel path
        parser.error(f'--kernel-isas: {err}')
    summary = summarise(rows)
    payload = record(args.device, sys.argv if argv is None else ['tools/analysis/benchmark_attention.py', *argv],
                     settings=vars(args), rows=rows, summary=summary)
    print(f"\n{hardware_line(payload['hardware'])}; {args.batch} x {args.heads} heads x d {args.head_dim}, "
          f'{args.dtype}, {args.layout} layout\n')
    print(table(rows))
    for key, value in summary.items():
        print(f'{key}: {value:.2f}')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(payload, f, indent=2)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
