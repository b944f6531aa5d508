"""Fault campaign: what a user's run does when data, processes or numbers go wrong.

Each test has a bounded time. Data faults go through the training entry point (``tools/train.py``,
in-process where the run stops before training, as a subprocess where a worker process matters);
process faults kill real training processes.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import hmait  # noqa: F401  (registers the timm models)
from hmait.data import generate_imagenet
from hmait.engine import ImageFolderDataset, find_resume_checkpoint
from hmait.engine.launch import train
from hmait.models.checkpoint import safe_load
from hmait.ops import MASK_MODES, dense_masked_attention, masked_attention

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')

TINY_CLS = """
_base_ = [{demo!r}]
model = dict(num_classes=3, model_kwargs=dict(embed_dims={dims}, depths=(1, 1), num_heads=(2, 4), masked_heads=(1, 1),
                                              strides=(4, 2), drop_path_rate=0.1))
train_dataloader = dict(batch_size=4, num_workers={workers}, persistent_workers={persistent},
                        dataset=dict(transform=dict(input_size=32)))
val_dataloader = dict(batch_size=6, num_workers=0, persistent_workers=False,
                      dataset=dict(transform=dict(input_size=32)))
test_dataloader = val_dataloader
default_hooks = dict(logger=dict(interval=1))
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', GLOO_SOCKET_IFNAME='lo', PYTHONPATH=str(ROOT))
    env.pop('WORLD_SIZE', None)
    return env


def _data_options(root: Path) -> list[str]:
    return [f'{loader}.dataset.data_root={root}' for loader in LOADERS]


def _write_cls_config(path: Path, dims: int = 16, workers: int = 0) -> Path:
    path.write_text(TINY_CLS.format(demo=str(CONFIGS / 'hmait_t_demo.py'), dims=dims, workers=workers,
                                    persistent=workers > 0))
    return path


@pytest.fixture(scope='module')
def cls_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('faults') / 'imagenet'
    generate_imagenet(str(root), num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=11)
    return root


def _log_of(work_dir: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(work_dir.glob('*/*.log')))


# --------------------------------------------------------------------------------------------
# Classification data


def _add_bad_and_unusual_images(root: Path) -> tuple[list[Path], list[Path]]:
    """Three unreadable files and two readable ones in unusual modes, in train/ of the first class."""
    folder = next(p for p in sorted((root / 'train').iterdir()) if p.is_dir())
    source = next(folder.glob('*.JPEG'))
    truncated, empty, text = folder / 'zz_truncated.JPEG', folder / 'zz_empty.jpg', folder / 'zz_notes.png'
    truncated.write_bytes(source.read_bytes()[: len(source.read_bytes()) // 2])
    empty.write_bytes(b'')
    text.write_text('not an image\n')
    cmyk, rgba = folder / 'aa_cmyk.jpg', folder / 'aa_rgba.png'
    Image.open(source).convert('CMYK').save(cmyk)
    rgba_img = Image.open(source).convert('RGBA')
    rgba_img.putalpha(128)
    rgba_img.save(rgba)
    return [truncated, empty, text], [cmyk, rgba]


def test_unreadable_images_are_skipped_and_listed_unusual_modes_are_read(cls_data, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(cls_data, root)
    bad, unusual = _add_bad_and_unusual_images(root)
    dataset = ImageFolderDataset(str(root), 'train', transform=dict(input_size=32, is_training=False, crop_pct=1.0))
    index = {path: i for i, (path, _) in enumerate(dataset.samples)}
    for path in unusual:
        item = dataset[index[str(path)]]
        assert item['inputs'].shape == (3, 32, 32) and torch.isfinite(item['inputs']).all()
    with pytest.warns(RuntimeWarning, match='skipping unreadable image') as record:
        for i in range(len(dataset)):
            dataset[i]
    assert {str(p) for p in bad} <= {str(w.message).split(': ')[0].split(' ')[-1] for w in record}
    assert sorted(dataset.unreadable_files) == sorted(map(str, bad))


@pytest.mark.slow
def test_training_counts_skipped_images_in_the_log(cls_data, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(cls_data, root)
    bad, _ = _add_bad_and_unusual_images(root)
    # One data loader worker: the skips happen in another process than the one that logs.
    config = _write_cls_config(tmp_path / 'cfg.py', workers=1)
    work_dir = tmp_path / 'work'
    proc = subprocess.run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir),
                           '--cfg-options', 'train_cfg.max_epochs=1', *_data_options(root)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = _log_of(work_dir)
    summary = re.search(r'train data: (\d+) unreadable image\(s\) skipped so far \(on_corrupt="skip"\): (.*)', log)
    assert summary, log[-3000:]
    assert int(summary.group(1)) == 3 and all(str(p) in summary.group(2) for p in bad)
    assert (work_dir / 'epoch_1.pth').is_file()


def test_randaugment_posterize_to_zero_bits_does_not_stop_training(cls_data):
    from timm.data import auto_augment

    table = dict(auto_augment.NAME_TO_OP)
    dataset = ImageFolderDataset(str(cls_data), 'train',
                                 transform=dict(input_size=32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1'))
    ops = [op for t in dataset.transform.transforms if isinstance(t, auto_augment.RandAugment) for op in t.ops]
    posterize = [op for op in ops if op.name == 'PosterizeIncreasing']
    assert posterize, 'the recipe\'s RandAugment has an increasing posterize op'
    image = Image.new('RGB', (8, 8), (200, 100, 50))
    # Magnitude 10 of the increasing variant asks for 0 bits, which Pillow >= 13 rejects by itself.
    black = posterize[0].aug_fn(image, 0)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    assert posterize[0].aug_fn(image, 8).tobytes() == image.tobytes()
    assert dict(auto_augment.NAME_TO_OP) == table, "timm's own op table is left alone"


def test_empty_class_folder_stops_training_naming_it(cls_data, tmp_path):
    root = tmp_path / 'data'
    shutil.copytree(cls_data, root)
    empty = root / 'train' / 'zz_empty_class'
    empty.mkdir()
    config = _write_cls_config(tmp_path / 'cfg.py')
    with pytest.raises(ValueError, match=rf"class folder '{empty}' holds no images"):
        train([str(config), '--work-dir', str(tmp_path / 'w'), '--cfg-options', *_data_options(root),
               'experiment_name=empty_class'])


# --------------------------------------------------------------------------------------------
# Detection and segmentation data, through the training entry point


@pytest.fixture(scope='module')
def coco(tmp_path_factory) -> dict:
    pytest.importorskip('mmdet')
    from hmait.data.dense_synthetic import make_coco
    return make_coco(str(tmp_path_factory.mktemp('coco')), num_train=4, num_val=2, image_size=(96, 128))


def _train_dense(config: str, root: str, tmp_path: Path, extra: list[str]) -> None:
    options = ['model.backbone.depths=[1,1,1,1]', 'model.backbone.init_cfg=None', 'train_dataloader.batch_size=2',
               f'experiment_name=fault_{tmp_path.name}', *extra]
    for loader in LOADERS:
        options += [f'{loader}.dataset.data_root={root}', f'{loader}.num_workers=0',
                    f'{loader}.persistent_workers=False']
    train([str(CONFIGS / config), '--work-dir', str(tmp_path / 'work'), '--cfg-options', *options])


def _corrupt_coco(content: dict, root: Path, fault: str) -> str:
    """Apply ``fault`` to the training annotations; returns what the error must say."""
    ann = content['annotations'][0]
    if fault == 'missing key':
        del ann['bbox']
        return rf"annotation number 0 id {ann['id']} lacks the key\(s\) \['bbox'\]"
    if fault == 'negative width':
        ann['bbox'][2] = -5.0
        return rf"annotation id {ann['id']} \(image_id {ann['image_id']}\) has bbox .* negative width"
    if fault == 'unknown category':
        ann['category_id'] = 99
        return rf"annotation id {ann['id']} \(image_id {ann['image_id']}\) has category_id 99"
    image = root / 'train2017' / content['images'][1]['file_name']
    image.unlink()
    return rf'missing from disk: {image}'


@pytest.mark.parametrize('fault', ['missing key', 'negative width', 'unknown category', 'missing image'])
def test_bad_coco_data_stops_training_naming_file_and_fault(coco, tmp_path, fault):
    root = tmp_path / 'coco'
    shutil.copytree(coco['root'], root)
    ann_file = root / 'annotations' / 'instances_train2017.json'
    content = json.loads(ann_file.read_text())
    expected = _corrupt_coco(content, root, fault)
    ann_file.write_text(json.dumps(content))
    error = FileNotFoundError if fault == 'missing image' else ValueError
    with pytest.raises(error, match=rf'{ann_file}.*{expected}' if fault != 'missing image' else expected):
        _train_dense('mask-rcnn_hmait-t_fpn_1x_coco.py', str(root), tmp_path,
                     ['train_cfg.max_epochs=1', 'train_dataloader.dataset.pipeline.2.scale=(128,96)'])


@pytest.fixture(scope='module')
def ade(tmp_path_factory) -> dict:
    pytest.importorskip('mmseg')
    from hmait.data.dense_synthetic import make_ade20k
    return make_ade20k(str(tmp_path_factory.mktemp('ade')), num_train=2, num_val=1, image_size=(96, 128))


@pytest.mark.parametrize('fault', ['wrong size', 'out of range'])
def test_bad_ade20k_labels_stop_training_naming_file_and_fault(ade, tmp_path, fault):
    root = tmp_path / 'ade'
    shutil.copytree(ade['root'], root)
    label_dir = root / 'annotations' / 'training'
    for path in sorted(label_dir.glob('*.png')):  # every training map, whichever the sampler draws first
        labels = np.array(Image.open(path))
        if fault == 'wrong size':
            Image.fromarray(labels).resize((64, 48), Image.NEAREST).save(path)
        else:
            labels[:4, :4] = 200  # ADE20K has 150 classes: file values 0..150
            Image.fromarray(labels).save(path)
    expected = (rf'label map {label_dir}/\S+\.png is 64x48 \(width x height\) but its image \S+ is 128x96'
                if fault == 'wrong size' else rf'label map {label_dir}/\S+\.png holds label values \[199\]')
    with pytest.raises(ValueError, match=expected):
        _train_dense('upernet_hmait-t_8xb2-160k_ade20k-512x512.py', str(root), tmp_path,
                     ['train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=2',
                      'train_dataloader.dataset.pipeline.2.scale=(128,96)',
                      'train_dataloader.dataset.pipeline.3.crop_size=(64,64)', 'model.data_preprocessor.size=(64,64)'])


# --------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_forward_on_large_inputs_stays_finite(dtype):
    model = timm.create_model('hmait_tiny').eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 1e3
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        logits = model(x)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all(), f'{dtype}: non-finite logits'


@pytest.mark.parametrize('mode', MASK_MODES)
@pytest.mark.parametrize('side', [1, 2, 3, 4])
@pytest.mark.parametrize('prefix', [0, 1])
def test_small_grids_match_the_dense_reference(mode, side, prefix):
    g = torch.Generator().manual_seed(side)
    q, k, v = (torch.randn(2, 3, prefix + side * side, 4, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    alpha = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    for mask_size in (3, 5):
        out = masked_attention(q, k, v, (side, side), mask_size, mode, alpha, prefix)
        ref = dense_masked_attention(q, k, v, (side, side), mask_size, mode, alpha, prefix)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12, rtol=0), (mode, side, mask_size)


@pytest.mark.parametrize('mode', MASK_MODES)
def test_model_with_1x1_to_4x4_stage_grids_runs_in_every_mode(mode):
    # 32-px input, patch 4, three merges: stage grids 8x8, 4x4, 2x2 and 1x1.
    model = timm.create_model('hmait_tiny', embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
                              masked_heads=(1, 1, 1, 1), mask_mode=mode, num_classes=5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Process faults


def _temporary_files(work_dir: Path) -> list[str]:
    return [e.name for e in os.scandir(work_dir) if e.name.endswith('.tmp')] if work_dir.is_dir() else []


@pytest.mark.slow
def test_kill_during_checkpoint_save_leaves_a_loadable_latest_checkpoint(cls_data, tmp_path):
    # A wider model than elsewhere, so that a checkpoint write (with fsync) takes a few milliseconds.
    config = _write_cls_config(tmp_path / 'cfg.py', dims=96)
    work_dir = tmp_path / 'work'
    epochs = 8
    args = [sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir), '--resume',
            '--cfg-options', f'train_cfg.max_epochs={epochs}', 'default_hooks.checkpoint.max_keep_ckpts=2',
            *_data_options(cls_data)]
    rng = random.Random(14)
    mid_save_kills, latest_epoch = 0, 0
    for _ in range(3):
        with open(tmp_path / 'run.log', 'w') as log:
            proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        # Kill at a random moment of a checkpoint write, once one complete checkpoint exists: as
        # soon as a new temporary checkpoint file appears, after a random 0-3 ms more.
        deadline = time.monotonic() + 180
        left_before = set(_temporary_files(work_dir))
        try:
            while find_resume_checkpoint(str(work_dir)) is None or not set(_temporary_files(work_dir)) - left_before:
                assert proc.poll() is None, (tmp_path / 'run.log').read_text()[-3000:]
                assert time.monotonic() < deadline, 'no checkpoint write within the time limit'
                time.sleep(0.0005)
            time.sleep(rng.uniform(0.0, 0.003))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        mid_save_kills += bool(set(_temporary_files(work_dir)) - left_before)
        # Whatever the moment: every checkpoint under its final name loads, and so does the latest,
        # which is never older than the one the previous round started from.
        for path in work_dir.glob('*.pth'):
            safe_load(str(path))
        latest = find_resume_checkpoint(str(work_dir))
        assert latest is not None, 'a checkpoint write was interrupted, and the earlier one is gone'
        epoch = safe_load(latest)['meta']['epoch']
        assert epoch >= max(latest_epoch, 1)
        latest_epoch = epoch
    assert mid_save_kills >= 1, 'no kill landed inside a checkpoint write'
    finished = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert re.search(r'resumed epoch: \d+', finished.stdout + finished.stderr, re.IGNORECASE)
    assert safe_load(str(work_dir / f'epoch_{epochs}.pth'))['meta']['epoch'] == epochs


def _process_tree(root: int) -> dict[int, str]:
    """pid -> command line of ``root`` and all its living descendants (torchrun starts its workers in
    sessions of their own, so the tree, not the session, is what belongs to a test)."""
    parents, cmdlines = {}, {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f'/proc/{entry}/stat').read_text()
            cmdline = Path(f'/proc/{entry}/cmdline').read_bytes().replace(b'\0', b' ').decode()
        except OSError:
            continue
        fields = stat[stat.rindex(')') + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != 'Z':
            parents[int(entry)], cmdlines[int(entry)] = int(fields[1]), cmdline
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in cmdlines:
            tree[pid] = cmdlines[pid]
        frontier += [child for child, parent in parents.items() if parent == pid]
    return tree


def _worker_of_rank(root: int, rank: int) -> int | None:
    for pid, cmdline in _process_tree(root).items():
        if 'tools/train.py' not in cmdline:
            continue
        try:
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        except OSError:
            continue
        if f'RANK={rank}'.encode() in environ:
            return pid
    return None


def _start_two_process_run(config: Path, data: Path, work_dir: Path, log_path: Path, *options: str):
    from helpers import free_port
    env = dict(_env(), PORT=str(free_port()), PYTHON=sys.executable)
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir', str(work_dir),
                                 '--cfg-options', 'train_cfg.max_epochs=1000', *options, *_data_options(data)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while not re.search(r'Epoch\(train\) +\[1\]', log_path.read_text()):
        assert proc.poll() is None, log_path.read_text()[-4000:]
        assert time.monotonic() < deadline, 'the two-process run did not start training in time'
        time.sleep(0.1)
    rank1 = _worker_of_rank(proc.pid, 1)
    assert rank1 is not None, _process_tree(proc.pid)
    return proc, rank1


def _alive(pid: int) -> bool:
    try:
        stat = Path(f'/proc/{pid}/stat').read_text()
    except OSError:
        return False
    return stat[stat.rindex(')') + 2] != 'Z'


def _stop_all(proc: subprocess.Popen, pids: list[int]) -> None:
    for pid in [*_process_tree(proc.pid), *pids]:
        for sig in (signal.SIGKILL, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    proc.wait(timeout=30)


@pytest.mark.slow
def test_killed_gloo_worker_ends_the_run_with_an_error(cls_data, tmp_path):
    config = _write_cls_config(tmp_path / 'cfg.py')
    log_path = tmp_path / 'dist.log'
    proc, rank1 = _start_two_process_run(config, cls_data, tmp_path / 'work', log_path)
    rank0 = _worker_of_rank(proc.pid, 0)
    try:
        os.kill(rank1, signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = proc.wait(timeout=120)
        elapsed = time.monotonic() - killed_at
        survivor_left = _alive(rank0)
    finally:
        _stop_all(proc, [rank0, rank1])
    assert returncode != 0, 'a run that lost a worker must not report success'
    assert elapsed < 60, f'the surviving worker took {elapsed:.0f} s to stop'
    assert not survivor_left, 'rank 0 was left running after the launcher exited'


@pytest.mark.slow
def test_hung_gloo_worker_ends_the_run_after_the_process_group_timeout(cls_data, tmp_path):
    config = _write_cls_config(tmp_path / 'cfg.py')
    log_path = tmp_path / 'dist.log'
    proc, rank1 = _start_two_process_run(config, cls_data, tmp_path / 'work', log_path,
                                         'env_cfg.dist_cfg.timeout=5')
    rank0 = _worker_of_rank(proc.pid, 0)
    try:
        os.kill(rank1, signal.SIGSTOP)  # alive but silent: only a timeout can tell
        stopped_at = time.monotonic()
        while _alive(rank0):
            assert time.monotonic() - stopped_at < 90, 'rank 0 still waits for the hung worker after 90 s'
            time.sleep(0.2)
        elapsed = time.monotonic() - stopped_at
    finally:
        _stop_all(proc, [rank0, rank1])
    assert proc.returncode != 0
    assert elapsed < 60, f'rank 0 took {elapsed:.0f} s to give up on the hung worker'
    # gloo's own error in rank 0: the 5-second timeout, not torch's 30-minute default.
    assert re.search(r'\[rank0\].*Timed out waiting 5000ms', log_path.read_text()), log_path.read_text()[-4000:]
