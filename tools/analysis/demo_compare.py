#!/usr/bin/env python
"""What masked heads buy on the demo's budget: the demo's H-MaiT, the same network with every head
global, and timm's Swin at the same size, each trained by tools/train.py on the same data with the
same recipe, for each seed; prints the final validation top-1 of each run and the median per model.

    python tools/analysis/demo_compare.py [--seeds 0 1 2] [--work-dir work_dirs/demo_compare]

Needs the demo data (`make demo` writes it). Each run takes as long as the demo's training.
"""
import argparse
import os.path as osp
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from hmait.engine.plot import find_scalar_logs, read_scalars  # noqa: E402

MODELS = {
    'H-MaiT (masked + global heads)': 'configs/hmait_t_demo.py',
    'H-MaiT, every head global': 'configs/hmait_t_demo_global.py',
    'Swin (4x4 windows)': 'configs/swin_t_demo.py',
}


def final_top1(work_dir: str) -> float:
    _, val = read_scalars(find_scalar_logs(work_dir))
    top1 = val.get('accuracy/top1')
    if not top1:
        raise ValueError(f'{work_dir}: no validation accuracy/top1 was logged')
    return top1[max(top1)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds to train with (default 0 1 2)')
    parser.add_argument('--work-dir', default='work_dirs/demo_compare', help='where the runs write')
    args = parser.parse_args(argv)
    results = {name: [] for name in MODELS}
    for seed in args.seeds:
        for name, config in MODELS.items():
            work_dir = osp.join(args.work_dir, f'{Path(config).stem}_seed{seed}')
            print(f'demo_compare: training {name}, seed {seed} -> {work_dir}', flush=True)
            proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'train.py'), str(ROOT / config), '--work-dir',
                                   work_dir, '--cfg-options', f'randomness.seed={seed}'],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f'demo_compare: error: {config} with seed {seed} failed:\n{proc.stderr[-3000:]}', file=sys.stderr)
                return proc.returncode
            results[name].append(final_top1(work_dir))
    print('| model | ' + ' | '.join(f'seed {s}' for s in args.seeds) + ' | median |')
    print('|---|' + '---:|' * (len(args.seeds) + 1))
    for name, values in results.items():
        print(f'| {name} | ' + ' | '.join(f'{v:.1f}' for v in values) + f' | {statistics.median(values):.1f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
