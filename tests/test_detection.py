"""Detection with H-MaiT through mmdet: every shipped config builds and predicts, the optimiser
follows the recipe, a short Mask R-CNN run trains and reports COCO box/mask AP, and bad data or a
missing pretrained checkpoint fails with an error naming the file."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from helpers import (
    CONFIGS,
    DET_CONFIGS,
    SMALL_DEPTHS,
    T_CHECKPOINT,
    python,
    read_scalars,
    require,
    run_tool,
    save_classification_checkpoint,
    tool,
)

from hmait.data.dense_synthetic import make_coco
from hmait.models import HMaiT

mmdet = require('mmdet')

from mmdet.registry import DATASETS, MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.model import revert_sync_batchnorm  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402


def _load(config: str) -> Config:
    cfg = Config.fromfile(CONFIGS / config)  # imports custom_imports (hmait, hmait.mm.det)
    init_default_scope(cfg.default_scope)
    return cfg


def _build(cfg: Config) -> torch.nn.Module:
    cfg.model.backbone.init_cfg = None
    return revert_sync_batchnorm(MODELS.build(cfg.model))


@pytest.mark.parametrize('config', DET_CONFIGS)
def test_config_builds_and_predicts_at_non_square_size(config):
    cfg = _load(config)
    assert cfg.model.backbone.type == 'HMaiT'
    assert cfg.model.backbone.init_cfg == dict(type='Pretrained', checkpoint=cfg.pretrained)
    assert cfg.train_dataloader.dataset.type == cfg.val_dataloader.dataset.type == 'CheckedCocoDataset'
    model = _build(cfg).eval()
    assert isinstance(model.backbone, HMaiT)
    height, width = 100, 152  # neither a multiple of the patch size nor of the FPN's 32
    feats = model.backbone(torch.zeros(1, 3, height, width))
    expected = {0: (96, 25, 38), 1: (192, 13, 19), 2: (384, 7, 10), 3: (768, 4, 5)}
    assert [tuple(f.shape[1:]) for f in feats] == [expected[i] for i in cfg.model.backbone.out_indices]
    data = dict(inputs=[torch.randint(0, 256, (3, height, width), dtype=torch.uint8)],
                data_samples=[DetDataSample(metainfo=dict(img_shape=(height, width),
                                                          ori_shape=(height, width), scale_factor=(1., 1.)))])
    with torch.no_grad():
        result = model.test_step(data)[0]
    boxes = result.pred_instances.bboxes
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and torch.isfinite(boxes).all()
    if 'masks' in result.pred_instances:
        assert tuple(result.pred_instances.masks.shape[1:]) == (height, width)


@pytest.mark.parametrize('config', [DET_CONFIGS[0], DET_CONFIGS[3], DET_CONFIGS[4]])
def test_optimiser_is_adamw_without_decay_on_norms(config):
    cfg = _load(config)
    cfg.model.backbone.depths = [1, 1, 1, 1]
    model = _build(cfg)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(wrapper.optimizer).__name__ == 'AdamW'
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    lrs = {g['lr'] for g in wrapper.optimizer.param_groups}
    assert lrs == {1e-4}
    named = dict(model.backbone.named_parameters())
    assert decay[id(named['layers.0.blocks.0.norm1.weight'])] == 0
    assert decay[id(named['norm3.bias'])] == 0
    assert decay[id(named['layers.0.blocks.0.attn.qkv.weight'])] == pytest.approx(0.05)


def test_missing_pretrained_checkpoint_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped path is relative to the working directory
    cfg = _load('mask-rcnn_hmait-t_fpn_1x_coco.py')
    cfg.model.backbone.depths = [1, 1, 1, 1]
    model = MODELS.build(cfg.model)
    with pytest.raises(FileNotFoundError, match=T_CHECKPOINT):
        model.init_weights()


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return make_coco(str(tmp_path_factory.mktemp('coco')), num_train=4, num_val=2, image_size=(96, 128))


def _dataset_cfg(root: str, **overrides) -> dict:
    cfg = _load('mask-rcnn_hmait-t_fpn_1x_coco.py')
    dataset = cfg.train_dataloader.dataset
    dataset.data_root = root
    dataset.update(overrides)
    return dataset


def test_generated_coco_loads_through_the_shipped_config(coco):
    dataset = DATASETS.build(_dataset_cfg(coco['root']))
    assert len(dataset) == 4
    sample = dataset[0]
    gt = sample['data_samples'].gt_instances
    assert len(gt) >= 1 and gt.masks.masks.shape[0] == len(gt)
    assert set(gt.labels.tolist()) <= {0, 1, 2}


def _copy_coco(coco: dict, tmp_path) -> tuple[str, dict]:
    root = str(tmp_path / 'coco')
    shutil.copytree(coco['root'], root)
    with open(f'{root}/annotations/instances_train2017.json') as f:
        return root, json.load(f)


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='instances_train2017.json'):
        DATASETS.build(_dataset_cfg(str(tmp_path)))


def test_unparseable_annotation_file_is_named(coco, tmp_path):
    root, _ = _copy_coco(coco, tmp_path)
    ann = f'{root}/annotations/instances_train2017.json'
    with open(ann, 'w') as f:
        f.write('{"images": [')
    with pytest.raises(ValueError, match=f'{ann} is not valid JSON'):
        DATASETS.build(_dataset_cfg(root))


def test_annotation_file_without_images_is_rejected(coco, tmp_path):
    root, _ = _copy_coco(coco, tmp_path)
    with open(f'{root}/annotations/instances_train2017.json', 'w') as f:
        json.dump(dict(categories=[]), f)
    with pytest.raises(ValueError, match='lacks the top-level key "images"'):
        DATASETS.build(_dataset_cfg(root))


def test_missing_image_is_named(coco, tmp_path):
    root, content = _copy_coco(coco, tmp_path)
    missing = f'{root}/train2017/{content["images"][1]["file_name"]}'
    os.remove(missing)
    with pytest.raises(FileNotFoundError, match=missing):
        DATASETS.build(_dataset_cfg(root))


def test_category_outside_the_file_categories_is_named(coco, tmp_path):
    root, content = _copy_coco(coco, tmp_path)
    content['annotations'][0]['category_id'] = 99  # mmdet alone would drop this object silently
    ann = f'{root}/annotations/instances_train2017.json'
    with open(ann, 'w') as f:
        json.dump(content, f)
    with pytest.raises(ValueError, match=rf'{ann}.*category_id 99'):
        DATASETS.build(_dataset_cfg(root))


def _coco_options(root: str, checkpoint: str) -> list[str]:
    opts = [f'model.backbone.init_cfg.checkpoint={checkpoint}', SMALL_DEPTHS,
            'train_cfg.max_epochs=1', 'train_dataloader.batch_size=2',
            # Test-size images instead of 1333x800 (index 2 / 1 is Resize in mmdet's COCO pipelines).
            'train_dataloader.dataset.pipeline.2.scale=(128,96)',
            'val_dataloader.dataset.pipeline.1.scale=(128,96)',
            'test_dataloader.dataset.pipeline.1.scale=(128,96)',
            f'val_evaluator.ann_file={root}/annotations/instances_val2017.json',
            f'test_evaluator.ann_file={root}/annotations/instances_val2017.json',
            # An untrained head scores every class about 1/81, below the 0.05 default: keep all
            # boxes so that COCO evaluation has detections to score.
            'model.test_cfg.rcnn.score_thr=0.0', 'default_hooks.logger.interval=1']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        opts += [f'{loader}.dataset.data_root={root}', f'{loader}.num_workers=0',
                 f'{loader}.persistent_workers=False']
    return opts


def test_mask_rcnn_trains_and_reports_coco_ap(coco, tmp_path):
    checkpoint = save_classification_checkpoint(tmp_path / 'hmait_t_imagenet.pth')
    work_dir = tmp_path / 'work'
    options = _coco_options(coco['root'], str(checkpoint))
    proc = run_tool([python(), tool('train.py'), str(CONFIGS / 'mask-rcnn_hmait-t_fpn_1x_coco.py'),
                     '--work-dir', str(work_dir), '--cfg-options', *options])
    log = proc.stdout + proc.stderr
    assert f'from {checkpoint}' in log, 'the ImageNet checkpoint was not loaded into the backbone'
    records = read_scalars(work_dir)
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)  # 4 images, batch 2, one epoch
    metrics = [r for r in records if 'coco/bbox_mAP' in r]
    assert metrics, f'no COCO evaluation in {records}'
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert 0.0 <= metrics[-1][key] <= 1.0, key
    assert (work_dir / 'epoch_1.pth').is_file()


def test_generator_lists_mmdet_coco_classes():
    from mmdet.datasets import CocoDataset

    from hmait.data.dense_synthetic import COCO_CLASSES
    assert COCO_CLASSES == CocoDataset.METAINFO['classes']
