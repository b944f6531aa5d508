#!/usr/bin/env python
"""Plot training loss and validation accuracy from a work dir to a PNG.

    python tools/analysis/plot_log.py WORK_DIR_OR_SCALARS_JSON [--out curves.png] [--metrics accuracy/top1 ...]
"""
import argparse
import os.path as osp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from hmait.engine.plot import plot_training_curves  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('path', help='work dir of tools/train.py, or one scalars.json')
    parser.add_argument('--out', help='PNG to write (default: WORK_DIR/curves.png)')
    parser.add_argument('--metrics', nargs='+', help='validation keys to plot (default: all, e.g. accuracy/top1)')
    args = parser.parse_args(argv)
    out = args.out or osp.join(args.path if osp.isdir(args.path) else osp.dirname(args.path), 'curves.png')
    try:
        summary = plot_training_curves(args.path, out, args.metrics)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f'error: {err}\n')
    last = ', '.join(f'{k} {v:.4g}' for k, v in summary['last'].items())
    print(f'wrote {out} from {len(summary["logs"])} log(s); last values: {last}')


if __name__ == '__main__':
    main()
