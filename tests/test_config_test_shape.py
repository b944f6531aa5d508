"""FLOP counts default to the input size a config tests at, not to one size for every task."""
import pytest
from helpers import CONFIGS
from mmengine.config import Config

from hmait.analysis.complexity import config_test_shape, count_config_complexity
from hmait.builder import read_config


@pytest.mark.parametrize('name,shape', [
    ('hmait_t_imagenet.py', (224, 224)),  # timm test transform, input_size 224
    ('hmait_t_demo.py', (64, 64)),
    # mmdet's test Resize box (1333, 800), padded to the data preprocessor's multiple of 32.
    ('mask-rcnn_hmait-t_fpn_1x_coco.py', (800, 1344)),
    ('upernet_hmait-t_8xb2-160k_ade20k-512x512.py', (512, 2048)),  # mmseg's test Resize (2048, 512)
])
def test_shape_comes_from_the_test_data_of_the_config(name, shape):
    assert config_test_shape(read_config(str(CONFIGS / name))) == shape


def test_config_without_a_test_size_asks_for_one():
    with pytest.raises(ValueError, match='no test input size'):
        config_test_shape(Config(dict(test_dataloader=dict(dataset=dict(pipeline=[dict(type='LoadImageFromFile')])))))


def test_count_uses_the_config_test_size_by_default():
    cfg = read_config(str(CONFIGS / 'hmait_t_demo.py'))
    default, _ = count_config_complexity(cfg)
    explicit, _ = count_config_complexity(cfg, (64, 64))
    larger, _ = count_config_complexity(cfg, (96, 96))
    assert default.macs == explicit.macs < larger.macs


def test_a_two_stage_detector_counts_the_same_on_every_run():
    """Its total depends on how many proposals the freshly initialised RPN keeps: the count seeds the
    initialisation (and leaves the caller's random state as it was)."""
    pytest.importorskip('mmdet')
    import torch
    options = {'model.backbone.depths': (1, 1, 1, 1), 'model.backbone.init_cfg': None}
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    counts = {count_config_complexity(str(CONFIGS / 'mask-rcnn_hmait-t_fpn_1x_coco.py'), (256, 320), options)[0].macs
              for _ in range(3)}
    assert len(counts) == 1
    assert torch.equal(torch.rand(1), expected_next)
