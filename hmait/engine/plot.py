"""Loss and validation curves from an mmengine work dir's ``scalars.json`` logs."""
from __future__ import annotations

import glob
import json
import os.path as osp

_NOT_METRICS = {'time', 'data_time', 'step', 'epoch', 'iter', 'lr', 'base_lr', 'memory', 'grad_norm', 'loss'}


def find_scalar_logs(path: str) -> list[str]:
    """``path`` itself when it is a file, else every ``<run>/vis_data/scalars.json`` under the work dir,
    oldest run first (a resumed run writes a new one)."""
    if osp.isfile(path):
        return [path]
    if not osp.isdir(path):
        raise FileNotFoundError(f'no such work dir or scalars.json: {path}')
    logs = sorted(glob.glob(osp.join(path, '*', 'vis_data', 'scalars.json')))
    if not logs:
        raise FileNotFoundError(f'no */vis_data/scalars.json under {path}: was it written by tools/train.py '
                                'with the LocalVisBackend (the default of the configs)?')
    return logs


def read_scalars(logs: list[str]) -> tuple[dict, dict]:
    """(train, val): each maps a key to ``{step: value}``; train steps are iterations, val steps epochs.

    A step logged twice (a resumed run repeating it) keeps the later value.
    """
    train: dict = {}
    val: dict = {}
    for log in logs:
        with open(log) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                step = record.get('step')
                if step is None:
                    continue
                target = train if 'loss' in record or 'lr' in record else val
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != 'step':
                        target.setdefault(key, {})[step] = value
    return train, val


def plot_training_curves(path: str, out_file: str, metrics: list[str] | None = None) -> dict:
    """Write a PNG with the training loss against iterations and validation metrics against epochs.

    ``metrics``: validation keys to plot (default: every one that is not a timing, e.g. accuracy/top1).
    Returns a summary: the logs read, the keys plotted and the last value of each.
    """
    import matplotlib
    matplotlib.use('Agg')  # files only; no display needed
    import matplotlib.pyplot as plt

    logs = find_scalar_logs(path)
    train, val = read_scalars(logs)
    if 'loss' not in train:
        raise ValueError(f'no training loss in {logs}')
    if metrics is None:
        metrics = sorted(k for k in val if k not in _NOT_METRICS)
    else:
        unknown = [m for m in metrics if m not in val]
        if unknown:
            raise ValueError(f'metrics {unknown} not in the validation logs; available: {sorted(val)}')
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = sorted(train['loss'])
    axes[0].plot(steps, [train['loss'][s] for s in steps], label='loss')
    axes[0].set_xlabel('iteration')
    axes[0].set_ylabel('training loss')
    axes[0].grid(alpha=0.3)
    for key in metrics:
        epochs = sorted(val[key])
        axes[1].plot(epochs, [val[key][e] for e in epochs], marker='o', markersize=3, label=key)
    axes[1].set_xlabel('epoch')
    axes[1].set_ylabel('validation')
    axes[1].grid(alpha=0.3)
    if metrics:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    last = {'loss': train['loss'][steps[-1]]}
    last.update({k: val[k][max(val[k])] for k in metrics})
    return dict(logs=logs, metrics=metrics, last=last, out_file=out_file)
