"""A resumed classification run ends with exactly the weights of an uninterrupted one.

The runs use the demo recipe (``configs/hmait_t_demo.py``, with one persistent data loader worker added; linear
warm-up for 2 epochs, then cosine) on a tiny model and 32-px images, with RandAugment, random
erasing, Mixup/CutMix and drop path all on, so every random stream of the recipe has to survive the
restart. Each resumed run is compared bit for bit with one uninterrupted 3-epoch run, resuming:
inside the warm-up (after epoch 1), at the scheduler boundary (after epoch 2, stopped there as a
user would with ``train_cfg.max_epochs=2``), and after a SIGKILL in the middle of epoch 3.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmait.data import generate_imagenet
from hmait.models.checkpoint import safe_load

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
ITERS_PER_EPOCH = 6  # 3 classes x 8 training images, batch 4

CONFIG = """
_base_ = [{demo!r}]
model = dict(num_classes=3,
             model_kwargs=dict(embed_dims=16, depths=(1, 1), num_heads=(1, 2), masked_heads=(1, 1), strides=(4, 2),
                               drop_path_rate=0.2),
             mixup=dict(prob=1.0))
# One persistent worker (the demo loads in the main process) with the full recipe's augmentation.
train_dataloader = dict(batch_size=4, num_workers=1, persistent_workers=True,
                        dataset=dict(transform=dict(input_size=32, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25)))
val_dataloader = dict(batch_size=6, dataset=dict(transform=dict(input_size=32)))
test_dataloader = val_dataloader
# The demo's 2 warm-up epochs, then cosine to the end of the run.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-2, by_epoch=True, begin=0, end=2, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min_ratio=1e-2, by_epoch=True, begin=2, end={epochs},
         convert_to_iter_based=True),
]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(max_keep_ckpts=-1, save_best=None))
randomness = dict(seed=1, deterministic=True)
"""

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    env.pop('WORLD_SIZE', None)
    return env


def _train_args(setup: tuple[Path, Path], work_dir: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    config, data = setup
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return [sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir), *extra, '--cfg-options',
            f'train_cfg.max_epochs={epochs}', *[f'{loader}.dataset.data_root={data}' for loader in loaders]]


def _train(setup, work_dir: Path, *extra: str, epochs: int = EPOCHS) -> str:
    proc = subprocess.run(_train_args(setup, work_dir, *extra, epochs=epochs), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'training failed ({proc.returncode}):\n{proc.stderr[-5000:]}'
    return proc.stdout + proc.stderr


def _weights(path: Path) -> dict:
    return safe_load(str(path))['state_dict']


def _assert_same_weights(full: Path, resumed: Path) -> None:
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f'resumed run differs from the uninterrupted one: max |dw| = {max(diff.values()):.3g} ' \
                     f'in {len(diff)} tensors, e.g. {sorted(diff)[:3]}'


@pytest.fixture(scope='module')
def setup(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp('resume')
    data = base / 'data'
    generate_imagenet(str(data), num_classes=3, train_per_class=8, val_per_class=2, size=32, seed=3)
    config = base / 'resume_cfg.py'
    config.write_text(CONFIG.format(demo=str(ROOT / 'configs' / 'hmait_t_demo.py'), epochs=EPOCHS))
    return config, data


@pytest.fixture(scope='module')
def uninterrupted(setup, tmp_path_factory) -> Path:
    work_dir = tmp_path_factory.mktemp('full')
    _train(setup, work_dir)
    # Training changed the weights in every epoch: equal final weights are not trivially equal.
    epochs = [_weights(work_dir / f'epoch_{n}.pth') for n in range(1, EPOCHS + 1)]
    for before, after in zip(epochs, epochs[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in after)
    return work_dir


def test_resume_inside_warmup(setup, uninterrupted, tmp_path):
    # The checkpoint a run stopped after epoch 1 (of 2 warm-up epochs) leaves behind.
    log = _train(setup, tmp_path, '--resume', str(uninterrupted / 'epoch_1.pth'))
    assert re.search(r'resumed epoch: 1, iter: 6', log, re.IGNORECASE), log[-3000:]
    _assert_same_weights(uninterrupted / f'epoch_{EPOCHS}.pth', tmp_path / f'epoch_{EPOCHS}.pth')


def test_resume_at_scheduler_boundary(setup, uninterrupted, tmp_path):
    # Stopped where warm-up ends and cosine begins, then continued with --resume: the case.
    _train(setup, tmp_path, epochs=2)
    assert (tmp_path / 'epoch_2.pth').is_file() and not (tmp_path / 'epoch_3.pth').exists()
    log = _train(setup, tmp_path, '--resume')
    assert re.search(r'resumed epoch: 2, iter: 12', log, re.IGNORECASE), log[-3000:]
    _assert_same_weights(uninterrupted / f'epoch_{EPOCHS}.pth', tmp_path / f'epoch_{EPOCHS}.pth')


def test_resume_after_sigkill_mid_epoch(setup, uninterrupted, tmp_path):
    log_path = tmp_path / 'killed_run.log'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(_train_args(setup, tmp_path), cwd=ROOT, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    mid_epoch = re.compile(rf'Epoch\(train\) +\[{EPOCHS}\]\[ *1/{ITERS_PER_EPOCH}\]')
    deadline = time.monotonic() + 240
    try:
        while not mid_epoch.search(log_path.read_text()):
            assert proc.poll() is None, f'run ended before epoch {EPOCHS}:\n{log_path.read_text()[-3000:]}'
            assert time.monotonic() < deadline, 'run did not reach the last epoch in time'
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its data loader worker
        proc.wait(timeout=30)
    assert not (tmp_path / f'epoch_{EPOCHS}.pth').exists(), 'the kill came too late: the last epoch had finished'
    log = _train(setup, tmp_path, '--resume')
    assert re.search(rf'resumed epoch: {EPOCHS - 1}', log, re.IGNORECASE), log[-3000:]
    _assert_same_weights(uninterrupted / f'epoch_{EPOCHS}.pth', tmp_path / f'epoch_{EPOCHS}.pth')
