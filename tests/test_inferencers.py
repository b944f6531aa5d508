"""The shipped Mask R-CNN and UperNet configs run through mmdet's ``DetInferencer`` and mmseg's
``MMSegInferencer`` exactly as a user calls them: a config file and a checkpoint file (written as
mmengine writes them, with ``meta.dataset_meta``), one generated image, predictions and the
visualised result written under ``out_dir``.

The models are shrunk through cfg options (one block per stage, test-size Resize) and the dumped
config drops the ImageNet ``init_cfg``: ``checkpoints/hmait_t_imagenet.pth`` does not exist here.
"""
from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from helpers import CONFIGS, SMALL_DEPTHS, require
from PIL import Image

from hmait.data.dense_synthetic import make_ade20k, make_coco
from hmait.engine import install_weights_only_loading
from hmait.models import HMaiT

require('mmdet')
require('mmseg')

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.logging import MessageHub  # noqa: E402
from mmengine.runner.checkpoint import get_state_dict, save_checkpoint, weights_to_cpu  # noqa: E402

# Not a multiple of the patch size or of 32, so the pipeline's Resize (to fit 160x128, width x
# height) changes the size and the predictions must be mapped back to the input's.
IMAGE_SIZE = (120, 152)  # (height, width)
TEST_RESIZE = 'test_dataloader.dataset.pipeline.1.scale=(160,128)'
# A backbone tensor whose saved values the inferencer's model must hold.
PROBE = 'backbone.patch_embed.proj.weight'


def _user_config(name: str, options: list[str], tmp_path: Path) -> tuple[Config, Path]:
    """The shipped config with ``options`` applied as ``--cfg-options`` would, dumped to a file."""
    cfg = Config.fromfile(CONFIGS / name)
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *options]).cfg_options)
    assert cfg.test_dataloader.dataset.pipeline[1].type == 'Resize', 'TEST_RESIZE assumes index 1'
    cfg.model.backbone.init_cfg = None  # no ImageNet weights here; the checkpoint holds them all
    path = tmp_path / name
    cfg.dump(str(path))
    dumped = Config.fromfile(path)
    assert dumped.custom_imports == cfg.custom_imports and 'hmait' in dumped.custom_imports.imports
    return dumped, path


def _save_checkpoint(model: torch.nn.Module, dataset_meta: dict, cfg: Config, path: Path,
                     **extra) -> torch.Tensor:
    """Write ``model`` as mmengine's Runner does (``meta`` + CPU ``state_dict``, and ``extra``
    entries such as ``message_hub``); return PROBE's saved value.

    PROBE gets a pattern no initialisation produces, so equal values after loading mean the
    inferencer loaded this file rather than keeping its own random weights.
    """
    state = weights_to_cpu(get_state_dict(model))
    state[PROBE] = torch.linspace(-1, 1, state[PROBE].numel()).reshape(state[PROBE].shape)
    meta = dict(dataset_meta=dataset_meta, cfg=cfg.pretty_text, experiment_name='test', epoch=1, iter=1)
    save_checkpoint(dict(meta=meta, state_dict=state, **extra), str(path))
    return state[PROBE]


def _image(source_dir: str, tmp_path: Path) -> tuple[Path, str]:
    """The first generated image, copied to ``tmp_path``, and its file name."""
    source = sorted(Path(source_dir).glob('*.jpg'))[0]
    target = tmp_path / source.name
    shutil.copy(source, target)
    with Image.open(target) as img:
        assert img.size == (IMAGE_SIZE[1], IMAGE_SIZE[0])
    return target, source.name


def _assert_visualisation(path: Path) -> None:
    assert path.is_file(), f'no visualisation at {path}'
    with Image.open(path) as vis:
        assert vis.size == (IMAGE_SIZE[1], IMAGE_SIZE[0]) and vis.mode == 'RGB'
        assert np.asarray(vis).std() > 0


def test_det_inferencer_runs_mask_rcnn_config_and_checkpoint(tmp_path):
    from mmdet.apis import DetInferencer, init_detector
    from mmdet.registry import DATASETS

    # An untrained head scores every class about 1/81, below the 0.05 default: keep every box so
    # that there are predictions (and masks) to check and draw.
    cfg, cfg_path = _user_config('mask-rcnn_hmait-t_fpn_1x_coco.py',
                                 [SMALL_DEPTHS, TEST_RESIZE, 'model.test_cfg.rcnn.score_thr=0.0'], tmp_path)
    model = init_detector(cfg, device='cpu')
    # What the Runner stores: the training dataset's metainfo (CocoDataset's classes and palette).
    dataset_meta = DATASETS.build(dict(cfg.train_dataloader.dataset, lazy_init=True)).metainfo
    assert len(dataset_meta['classes']) == len(dataset_meta['palette']) == 80
    ckpt_path = tmp_path / 'mask-rcnn_hmait-t.pth'
    saved = _save_checkpoint(model, dataset_meta, cfg, ckpt_path)
    image, name = _image(make_coco(str(tmp_path / 'coco'), num_train=1, num_val=1, image_size=IMAGE_SIZE)['val_img'],
                         tmp_path)

    inferencer = DetInferencer(model=str(cfg_path), weights=str(ckpt_path), device='cpu')
    assert isinstance(inferencer.model.backbone, HMaiT)
    torch.testing.assert_close(inferencer.model.state_dict()[PROBE], saved, rtol=0, atol=0)
    assert tuple(inferencer.model.dataset_meta['classes']) == tuple(dataset_meta['classes'])

    out_dir = tmp_path / 'outputs'
    result = inferencer(str(image), out_dir=str(out_dir), no_save_pred=False, pred_score_thr=0.0)
    (pred,) = result['predictions']
    count = len(pred['labels'])
    assert count > 0
    assert len(pred['scores']) == len(pred['bboxes']) == len(pred['masks']) == count
    boxes = np.asarray(pred['bboxes'])
    assert boxes.shape == (count, 4) and np.isfinite(boxes).all()
    # Boxes and masks come back in the input image's coordinates, not the resized ones.
    height, width = IMAGE_SIZE
    assert (boxes[:, [0, 2]] <= width + 1e-3).all() and (boxes[:, [1, 3]] <= height + 1e-3).all()
    assert all(mask['size'] == [height, width] for mask in pred['masks'])  # RLE-encoded
    assert all(0 <= label < 80 for label in pred['labels'])
    assert all(0.0 <= score <= 1.0 for score in pred['scores'])

    _assert_visualisation(out_dir / 'vis' / name)
    with open(out_dir / 'preds' / f'{Path(name).stem}.json') as f:
        written = json.load(f)
    assert written['labels'] == pred['labels'] and len(written['masks']) == count


def test_mmseg_inferencer_runs_upernet_config_and_checkpoint(tmp_path):
    from mmseg.apis import MMSegInferencer, init_model
    from mmseg.registry import DATASETS

    cfg, cfg_path = _user_config('upernet_hmait-t_8xb2-160k_ade20k-512x512.py', [SMALL_DEPTHS, TEST_RESIZE],
                                 tmp_path)
    model = init_model(cfg, device='cpu')
    dataset_meta = DATASETS.build(dict(cfg.train_dataloader.dataset, lazy_init=True)).metainfo
    num_classes = len(dataset_meta['classes'])
    assert num_classes == len(dataset_meta['palette']) == cfg.model.decode_head.num_classes == 150
    ckpt_path = tmp_path / 'upernet_hmait-t.pth'
    saved = _save_checkpoint(model, dataset_meta, cfg, ckpt_path)
    ade = make_ade20k(str(tmp_path / 'ade'), num_train=1, num_val=1, image_size=IMAGE_SIZE)
    image, name = _image(ade['val_img'], tmp_path)

    inferencer = MMSegInferencer(model=str(cfg_path), weights=str(ckpt_path), device='cpu')
    assert isinstance(inferencer.model.backbone, HMaiT)
    torch.testing.assert_close(inferencer.model.state_dict()[PROBE], saved, rtol=0, atol=0)
    # Without the checkpoint's meta the inferencer would fall back to Cityscapes' 19 classes.
    assert tuple(inferencer.model.dataset_meta['classes']) == tuple(dataset_meta['classes'])

    out_dir = tmp_path / 'outputs'
    result = inferencer(str(image), out_dir=str(out_dir))
    pred = result['predictions']
    assert isinstance(pred, np.ndarray) and pred.shape == IMAGE_SIZE
    assert 0 <= pred.min() and pred.max() < num_classes
    assert tuple(inferencer.visualizer.dataset_meta['classes']) == tuple(dataset_meta['classes'])

    _assert_visualisation(out_dir / 'vis' / name)
    written = np.asarray(Image.open(out_dir / 'pred' / '00000000_pred.png'))
    np.testing.assert_array_equal(written, pred)


def test_mmseg_inferencer_loads_a_training_checkpoint_after_install_weights_only_loading(tmp_path):
    """A checkpoint from tools/train.py also holds the Runner's message hub (``HistoryBuffer``
    objects), which torch's default ``weights_only=True`` refuses under mmengine's bare
    ``torch.load``; the documented ``install_weights_only_loading()`` call makes it loadable."""
    from mmseg.apis import MMSegInferencer, init_model
    from mmseg.registry import DATASETS

    install_weights_only_loading()  # what tools/train.py does before saving, and a user before loading
    cfg, cfg_path = _user_config('upernet_hmait-t_8xb2-160k_ade20k-512x512.py', [SMALL_DEPTHS], tmp_path)
    model = init_model(cfg, device='cpu')
    hub = MessageHub.get_instance('test_inferencers_training_checkpoint')
    hub.update_scalar('train/loss', 1.5)
    hub.update_info('iter', 1)
    dataset_meta = DATASETS.build(dict(cfg.train_dataloader.dataset, lazy_init=True)).metainfo
    ckpt_path = tmp_path / 'iter_1.pth'
    saved = _save_checkpoint(model, dataset_meta, cfg, ckpt_path, message_hub=hub.state_dict())
    # The pickle names the class (whether or not an earlier test already allow-listed it process-wide).
    with zipfile.ZipFile(ckpt_path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith('data.pkl')))
    assert b'HistoryBuffer' in pickled

    inferencer = MMSegInferencer(model=str(cfg_path), weights=str(ckpt_path), device='cpu')
    torch.testing.assert_close(inferencer.model.state_dict()[PROBE], saved, rtol=0, atol=0)
    assert tuple(inferencer.model.dataset_meta['classes']) == tuple(dataset_meta['classes'])
