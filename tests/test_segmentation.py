"""Segmentation with H-MaiT through mmseg: every shipped config builds and predicts, the optimiser
follows the recipe, UperNet trains and reports mIoU in one process and in two gloo processes (whose
checkpoint tools/test.py then evaluates), and bad data or a missing pretrained checkpoint fails
with an error naming the file."""
from __future__ import annotations

import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    CONFIGS,
    SEG_CONFIGS,
    SMALL_DEPTHS,
    T_CHECKPOINT,
    free_port,
    python,
    read_scalars,
    require,
    run_tool,
    save_classification_checkpoint,
    tool,
)
from PIL import Image

from hmait.data.dense_synthetic import make_ade20k
from hmait.models import HMaiT

mmseg = require('mmseg')

from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import DATASETS, MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

UPERNET_T = 'upernet_hmait-t_8xb2-160k_ade20k-512x512.py'


def _load(config: str) -> Config:
    cfg = Config.fromfile(CONFIGS / config)  # imports custom_imports (hmait, hmait.mm.seg)
    init_default_scope(cfg.default_scope)
    return cfg


def _build(cfg: Config) -> torch.nn.Module:
    cfg.model.backbone.init_cfg = None
    return revert_sync_batchnorm(MODELS.build(cfg.model))


@pytest.mark.parametrize('config', SEG_CONFIGS)
def test_config_builds_and_predicts_at_non_square_size(config):
    cfg = _load(config)
    assert cfg.model.backbone.type == 'HMaiT' and cfg.model.backbone.drop_path_rate == 0.3
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=cfg.pretrained)
    assert cfg.train_dataloader.dataset.type == cfg.val_dataloader.dataset.type == 'CheckedADE20KDataset'
    model = _build(cfg).eval()
    assert isinstance(model.backbone, HMaiT)
    height, width = 90, 148
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width))
    data = dict(inputs=[torch.randint(0, 256, (3, height, width), dtype=torch.uint8)],
                data_samples=[SegDataSample(metainfo=meta)])
    with torch.no_grad():
        result = model.test_step(data)[0]
    pred = result.pred_sem_seg.data
    assert tuple(pred.shape) == (1, height, width)
    assert 0 <= int(pred.min()) and int(pred.max()) < 150


def test_schedule_and_optimiser_follow_the_swin_recipe():
    cfg = _load(UPERNET_T)
    assert cfg.train_cfg.max_iters == 160000
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.end, poly.type, poly.begin) == ('LinearLR', 1500, 'PolyLR', 1500)
    cfg.model.backbone.depths = [1, 1, 1, 1]
    model = _build(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(wrapper.optimizer).__name__ == 'AdamW'
    assert {g['lr'] for g in wrapper.optimizer.param_groups} == {6e-5}
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    named = dict(model.backbone.named_parameters())
    assert decay[id(named['layers.1.blocks.0.norm2.weight'])] == 0
    assert decay[id(named['layers.1.blocks.0.mlp.fc1.weight'])] > 0


def test_missing_pretrained_checkpoint_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _load(UPERNET_T)
    cfg.model.backbone.depths = [1, 1, 1, 1]
    model = MODELS.build(cfg.model)
    with pytest.raises(FileNotFoundError, match=T_CHECKPOINT):
        model.init_weights()


@pytest.fixture(scope='module')
def ade(tmp_path_factory):
    return make_ade20k(str(tmp_path_factory.mktemp('ade')), num_train=4, num_val=2, image_size=(96, 128))


def _dataset_cfg(root: str, split: str = 'val') -> dict:
    cfg = _load(UPERNET_T)
    dataset = cfg[f'{split}_dataloader'].dataset
    dataset.data_root = root
    return dataset


def test_generated_ade20k_loads_through_the_shipped_config(ade):
    dataset = DATASETS.build(_dataset_cfg(ade['root']))
    assert len(dataset) == 2
    labels = dataset[0]['data_samples'].gt_sem_seg.data
    # File value 0 becomes the ignore index 255 and class k becomes k - 1 (reduce_zero_label).
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2, 3, 255} and 255 in labels


def _copy_ade(ade: dict, tmp_path) -> str:
    root = str(tmp_path / 'ade')
    shutil.copytree(ade['root'], root)
    return root


def test_label_values_outside_the_classes_are_named(ade, tmp_path):
    root = _copy_ade(ade, tmp_path)
    bad = f'{root}/annotations/validation/ADE_val_00000002.png'
    labels = np.array(Image.open(bad))
    labels[:4, :4] = 200  # ADE20K has 150 classes: file values 0..150
    Image.fromarray(labels).save(bad)
    dataset = DATASETS.build(_dataset_cfg(root))
    dataset[0]  # the untouched map passes
    with pytest.raises(ValueError, match=rf'{bad} holds label values \[199\]'):
        dataset[1]


def test_missing_label_map_is_named(ade, tmp_path):
    root = _copy_ade(ade, tmp_path)
    missing = f'{root}/annotations/training/ADE_train_00000003.png'
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=missing):
        DATASETS.build(_dataset_cfg(root, 'train'))


def test_missing_or_empty_image_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f'{tmp_path}/images/training'):
        DATASETS.build(_dataset_cfg(str(tmp_path), 'train'))
    os.makedirs(tmp_path / 'images' / 'training')
    os.makedirs(tmp_path / 'annotations' / 'training')
    with pytest.raises(ValueError, match=f'no "\\*.jpg" images found in {tmp_path}/images/training'):
        DATASETS.build(_dataset_cfg(str(tmp_path), 'train'))


def _ade_options(root: str, checkpoint: str | None) -> list[str]:
    opts = [SMALL_DEPTHS, 'train_cfg.max_iters=4', 'train_cfg.val_interval=4',
            'default_hooks.checkpoint.interval=4', 'default_hooks.logger.interval=1',
            'train_dataloader.batch_size=2',
            # Test-size images and crops instead of 2048x512 / 512x512 (index 2 is RandomResize,
            # 3 RandomCrop in the training pipeline, 1 Resize in the test pipeline).
            'train_dataloader.dataset.pipeline.2.scale=(128,96)',
            'train_dataloader.dataset.pipeline.3.crop_size=(64,64)',
            'model.data_preprocessor.size=(64,64)',
            'val_dataloader.dataset.pipeline.1.scale=(128,96)',
            'test_dataloader.dataset.pipeline.1.scale=(128,96)']
    if checkpoint is not None:
        opts.append(f'model.backbone.init_cfg.checkpoint={checkpoint}')
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [f'{loader}.dataset.data_root={root}', f'{loader}.num_workers=0',
                 f'{loader}.persistent_workers=False']
    return opts


def _miou(records: list[dict]) -> float:
    values = [r['mIoU'] for r in records if 'mIoU' in r]
    assert values, f'no mIoU in {records}'
    return values[-1]


def test_upernet_trains_and_reports_miou(ade, tmp_path):
    checkpoint = save_classification_checkpoint(tmp_path / 'hmait_t_imagenet.pth')
    work_dir = tmp_path / 'work'
    proc = run_tool([python(), tool('train.py'), str(CONFIGS / UPERNET_T), '--work-dir', str(work_dir),
                     '--cfg-options', *_ade_options(ade['root'], str(checkpoint))])
    assert f'from {checkpoint}' in proc.stdout + proc.stderr
    records = read_scalars(work_dir)
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert 0.0 <= _miou(records) <= 100.0


def test_missing_pretrained_checkpoint_stops_tools_train(ade, tmp_path):
    options = _ade_options(ade['root'], None)
    proc = run_tool([python(), tool('train.py'), str(CONFIGS / UPERNET_T), '--work-dir',
                     str(tmp_path / 'work'), '--cfg-options', *options], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert 'FileNotFoundError' in proc.stderr and T_CHECKPOINT in proc.stderr


def test_two_process_gloo_training_then_tools_test(ade, tmp_path):
    checkpoint = save_classification_checkpoint(tmp_path / 'hmait_t_imagenet.pth')
    work_dir = tmp_path / 'dist'
    options = _ade_options(ade['root'], str(checkpoint))
    env = dict(PYTHON=python(), PORT=str(free_port()), GLOO_SOCKET_IFNAME='lo', OMP_NUM_THREADS='1')
    proc = run_tool(['bash', tool('dist_train.sh'), str(CONFIGS / UPERNET_T), '2',
                     '--work-dir', str(work_dir), '--cfg-options', *options], env=env)
    log = proc.stdout + proc.stderr
    assert re.search(r'Distributed training: True', log)
    assert 'SyncBN layers in the model config replaced by BN' in log
    records = read_scalars(work_dir)
    assert len([r for r in records if 'loss' in r]) == 4
    assert 0.0 <= _miou(records) <= 100.0
    saved = work_dir / 'iter_4.pth'
    assert saved.is_file()

    proc = run_tool([python(), tool('test.py'), str(CONFIGS / UPERNET_T), str(saved), '--work-dir',
                     str(tmp_path / 'test'), '--cfg-options', *options])
    match = re.search(r'mIoU: ([0-9.]+)', proc.stdout + proc.stderr)
    assert match, proc.stdout[-3000:]
    assert 0.0 <= float(match.group(1)) <= 100.0
