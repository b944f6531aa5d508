"""Benchmark the masked-attention op: every mode against the dense reference and global SDPA.

    python tools/analysis/benchmark_attention.py [--grids 28 56 112 224] [--batch 1] [--out FILE.json]

Prints a markdown table and the issue's target ratios, and writes JSON with the hardware and command.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from hmait.analysis.attention_benchmark import PATHS, benchmark_attention, hardware, markdown_table, summarise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--grids', type=int, nargs='+', default=[28, 56, 112, 224], help='grid sides')
    parser.add_argument('--paths', nargs='+', default=list(PATHS), choices=PATHS)
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--heads', type=int, default=3)
    parser.add_argument('--head-dim', type=int, default=32)
    parser.add_argument('--mask-size', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--dtype', default='float32', choices=['float32', 'float16', 'bfloat16'])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--max-quadratic-tokens', type=int, default=112 * 112,
                        help='skip the O(N^2) paths (soft, dense, SDPA) above this many tokens')
    parser.add_argument('--out', default='work_dirs/benchmark_attention.json', help='JSON output path')
    args = parser.parse_args(argv)
    for name in ('batch', 'heads', 'head_dim', 'repeats'):
        if getattr(args, name) <= 0:
            parser.error(f'--{name.replace("_", "-")} must be positive, got {getattr(args, name)}')

    rows = benchmark_attention(args.grids, args.paths, args.batch, args.heads, args.head_dim, args.mask_size,
                               args.repeats, args.warmup, getattr(torch, args.dtype), args.device,
                               args.max_quadratic_tokens)
    summary = summarise(rows)
    print(markdown_table(rows))
    for key, value in summary.items():
        print(f'{key}: {value:.2f}')
    result = dict(command=' '.join(['python', 'tools/analysis/benchmark_attention.py'] + (argv or sys.argv[1:])),
                  hardware=hardware(), settings=vars(args), rows=rows, summary=summary)
    import os
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
