"""End-to-end classification training through tools/train.py and tools/test.py on generated data."""
from __future__ import annotations

import json
import os
import re
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmait.data import generate_imagenet
from hmait.engine.launch import test as evaluate
from hmait.engine.launch import train
from hmait.models.checkpoint import extract_state_dict, safe_load

ROOT = Path(__file__).resolve().parents[1]
TOP1 = re.compile(r'Epoch\(val\).*accuracy/top1: ([0-9.]+)')

# A two-stage H-MaiT at 32 px with the demo's recipe plus Mixup/CutMix (its random draws must
# survive a resume too).
TINY_CONFIG = """
_base_ = [{demo!r}]
model = dict(num_classes=3,
             model_kwargs=dict(embed_dims=16, depths=(1, 1), num_heads=(1, 2), masked_heads=(1, 1), strides=(4, 2),
                               drop_path_rate=0.1),
             mixup=dict(prob=1.0))
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                        dataset=dict(transform=dict(input_size=32)))
val_dataloader = dict(batch_size=6, num_workers=0, persistent_workers=False,
                      dataset=dict(transform=dict(input_size=32)))
test_dataloader = val_dataloader
default_hooks = dict(logger=dict(interval=2))
randomness = dict(seed=1, deterministic=True)
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', GLOO_SOCKET_IFNAME='lo', PYTHONPATH=str(ROOT))
    env.pop('WORLD_SIZE', None)
    return env


def _run(args: list[str], expect_ok: bool = True, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}')
    return proc


def _train(config: Path, data: Path, work_dir: Path, *extra: str, epochs: int = 2) -> subprocess.CompletedProcess:
    return _run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir), '--cfg-options',
                 f'train_cfg.max_epochs={epochs}', *_data_options(data), *extra])


def _data_options(data: Path) -> list[str]:
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return [f'{loader}.dataset.data_root={data}' for loader in loaders]


def _weights(path: Path) -> dict:
    return safe_load(str(path))['state_dict']


@pytest.fixture(scope='module')
def setup(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp('cls')
    data = base / 'data'
    generate_imagenet(str(data), num_classes=3, train_per_class=8, val_per_class=4, size=32, seed=3)
    config = base / 'tiny_cls.py'
    config.write_text(TINY_CONFIG.format(demo=str(ROOT / 'configs' / 'hmait_t_demo.py')))
    return config, data


@pytest.fixture(scope='module')
def trained(setup, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two uninterrupted epochs, logged for TensorBoard too."""
    config, data = setup
    work_dir = tmp_path_factory.mktemp('run_full')
    return work_dir, _train(config, data, work_dir, '--tensorboard')


def test_single_process_train_and_val(trained):
    work_dir, proc = trained
    top1 = [float(v) for v in TOP1.findall(proc.stdout + proc.stderr)]
    assert len(top1) == 2, 'one validation per epoch with top-1 in the log'
    assert all(0.0 <= v <= 100.0 for v in top1)
    assert 'eta:' in proc.stdout + proc.stderr  # progress with ETA
    assert (work_dir / 'epoch_2.pth').is_file()
    assert Path((work_dir / 'last_checkpoint').read_text().strip()) == work_dir / 'epoch_2.pth'
    assert list(work_dir.glob('best_accuracy_top1_epoch_*.pth')), 'best checkpoint by top-1 kept'
    assert not list(work_dir.glob('.*.tmp')), 'no temporary checkpoint files left behind'
    # --tensorboard: mmengine's TensorBoard backend wrote event files with the training scalars.
    events = list(work_dir.glob('*/vis_data/events.out.tfevents.*'))
    assert events, f'no TensorBoard event file under {work_dir}'
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()['scalars']
    assert {'loss', 'lr', 'accuracy/top1'} <= set(scalars), scalars
    # The classifier's keys carry the backbone prefix that the detection backbone strips.
    weights = _weights(work_dir / 'epoch_2.pth')
    assert any(k.startswith('backbone.layers.0.blocks.0.attn') for k in weights)
    stripped = extract_state_dict(dict(state_dict=weights))
    assert 'layers.0.blocks.0.attn.qkv.weight' in stripped and 'head.fc.weight' in stripped


def test_test_tool_reports_top1_of_checkpoint(trained, setup):
    work_dir, proc = trained
    config, data = setup
    val_top1 = [float(v) for v in TOP1.findall(proc.stdout + proc.stderr)]
    out = _run([sys.executable, 'tools/test.py', str(config), str(work_dir / 'epoch_2.pth'), '--work-dir',
                str(work_dir / 'test'), '--cfg-options', *_data_options(data)])
    found = re.findall(r'Epoch\(test\).*accuracy/top1: ([0-9.]+)', out.stdout + out.stderr)
    assert found, out.stdout[-2000:]
    # The same weights on the same validation images: the last validation's number.
    assert float(found[-1]) == pytest.approx(val_top1[-1])


def test_test_tool_refuses_a_checkpoint_that_does_not_fit(trained, setup, tmp_path, capsys):
    """A checkpoint of another width is refused before any evaluation, naming the shapes; --partial-load
    evaluates with what fits."""
    work_dir, _ = trained
    config, data = setup
    weights = _weights(work_dir / 'epoch_2.pth')
    weights['backbone.patch_embed.proj.weight'] = torch.zeros(8, 3, 4, 4)
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': weights}, other)
    args = [str(config), str(other), '--work-dir', str(tmp_path / 'w'), '--cfg-options', *_data_options(data)]
    with pytest.raises(SystemExit) as exit_info:
        evaluate(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f'test: error: checkpoint {other} does not fit the model (TimmImageClassifier; ')
    assert 'backbone.patch_embed.proj.weight (file (8, 3, 4, 4), model (16, 3, 4, 4))' in err
    assert '--partial-load evaluates' in err
    metrics = evaluate([*args, '--partial-load'])
    assert 0 <= metrics['accuracy/top1'] <= 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_gloo_train_and_val(setup, tmp_path):
    config, data = setup
    env = dict(_env(), PORT=str(_free_port()), PYTHON=sys.executable)
    args = ['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir', str(tmp_path), '--cfg-options',
            'train_cfg.max_epochs=1', *_data_options(data)]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    log = next(tmp_path.glob('*/*.log')).read_text()  # rank 0's log file
    assert 'Distributed training: True' in log and "dist_cfg: {'backend': 'gloo'}" in log
    # 24 training images, 4 per batch: 6 iterations in one process, 3 when two processes share them.
    assert re.search(r'Epoch\(train\) \[1\]\[\d+/3\]', log)
    assert TOP1.search(log), 'validation with top-1 after the epoch'
    assert (tmp_path / 'epoch_1.pth').is_file()


def test_checkpoint_with_pickled_object_is_refused(trained, setup, tmp_path):
    work_dir, _ = trained
    config, data = setup
    marker = tmp_path / 'code_ran'
    evil = tmp_path / 'evil.pth'
    checkpoint = safe_load(str(work_dir / 'epoch_2.pth'))
    checkpoint['meta']['note'] = _Payload(str(marker))
    torch.save(checkpoint, evil)
    proc = _run([sys.executable, 'tools/test.py', str(config), str(evil), '--work-dir', str(tmp_path / 'w'),
                 '--cfg-options', *_data_options(data)], expect_ok=False)
    assert proc.returncode != 0
    assert f'refusing to load checkpoint {evil}' in proc.stderr
    assert not marker.exists(), 'the pickled object must not have been executed'


class _Payload:
    """An object whose unpickling runs code: what weights-only loading must refuse."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_missing_data_root_names_path_and_generator(setup, tmp_path):
    config, _ = setup
    missing = tmp_path / 'no_such_data'
    # In-process: the same entry point as tools/train.py, without another interpreter start.
    with pytest.raises(FileNotFoundError, match=rf"data_root '{missing}' does not exist.*"
                                                r'tools/generate_demo_data\.py imagenet'):
        train([str(config), '--work-dir', str(tmp_path / 'w'), '--cfg-options', *_data_options(missing)])


def test_plot_log_writes_png(trained, tmp_path, monkeypatch, capsys):
    work_dir, _ = trained
    out = tmp_path / 'curves.png'
    monkeypatch.setattr(sys, 'argv', ['plot_log.py', str(work_dir), '--out', str(out)])
    runpy.run_path(str(ROOT / 'tools' / 'analysis' / 'plot_log.py'), run_name='__main__')
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'accuracy/top1' in capsys.readouterr().out
    scalars = next(work_dir.glob('*/vis_data/scalars.json'))
    assert any('accuracy/top1' in json.loads(line) for line in scalars.read_text().splitlines() if line.strip())


def test_train_refuses_bad_arguments_in_one_line(setup, tmp_path, capsys):
    config, data = setup
    for extra, message in ((['--resume', str(tmp_path / 'gone.pth')], f'--resume checkpoint not found: {tmp_path}'),
                           (['--auto-scale-lr'], '--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=N)')):
        with pytest.raises(SystemExit) as exit_info:
            train([str(config), '--work-dir', str(tmp_path / 'w'), '--cfg-options', 'auto_scale_lr=None',
                   *_data_options(data), *extra])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f'train: error: {message}')

