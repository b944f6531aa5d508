"""The one way every tool builds a model and loads weights: hmait.builder."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from hmait.builder import build_backbone, build_model, create_timm_model, load_weights, read_config
from hmait.models import HMaiT, HMaiTClassifier
from hmait.models.checkpoint import state_dict_fit

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / 'configs'
SMALL = dict(embed_dims=32, depths=(1, 1, 1, 1), num_heads=(2, 4, 8, 16), masked_heads=(2, 4, 3, 0))


def _classification_config(path: Path, **kwargs) -> Path:
    model_kwargs = {**SMALL, **kwargs}
    path.write_text("model = dict(type='TimmImageClassifier', model_name='hmait_tiny', num_classes=3, "
                    f'model_kwargs={model_kwargs!r})\n')
    return path


def test_each_source_gives_the_part_asked_for(tmp_path):
    config = _classification_config(tmp_path / 'cls.py')
    classifier = build_model(str(config))
    assert isinstance(classifier, HMaiTClassifier) and classifier.num_classes == 3 and not classifier.training
    assert isinstance(build_model('hmait_tiny', num_classes=4, **SMALL), HMaiTClassifier)
    features = build_model('hmait_tiny', features_only=True, **SMALL)
    assert [f.shape[1] for f in features(torch.zeros(1, 3, 64, 64))] == [32, 64, 128, 256]
    detection = str(CONFIGS / 'mask-rcnn_hmait-t_fpn_1x_coco.py')
    backbone = build_model(detection, cfg_options={'model.backbone.depths': (1, 1, 1, 1)})
    assert isinstance(backbone, HMaiT) and len(backbone.layers[2].blocks) == 1
    with pytest.raises(ValueError, match="expected a classification config.*its model is 'MaskRCNN'"):
        build_model(detection, part='classifier')
    with pytest.raises(ValueError, match=r"cls\.py' has no model.backbone; its model is 'TimmImageClassifier'"):
        build_model(str(config), part='backbone')
    with pytest.raises(ValueError, match=r"\['features_only'\] apply to timm model names"):
        build_model(str(config), features_only=True)
    with pytest.raises(ValueError, match="part must be one of .* got 'head'"):
        build_model('hmait_tiny', part='head')


def test_unknown_names_and_files_are_named():
    with pytest.raises(ValueError, match="model 'hmait_tinyy' is not a timm model; similar: hmait_tiny"):
        create_timm_model('hmait_tinyy')
    with pytest.raises(FileNotFoundError, match="config file 'nowhere.py' does not exist"):
        read_config('nowhere.py')
    with pytest.raises(FileNotFoundError, match="checkpoint 'nowhere.pth' does not exist"):
        build_model('hmait_tiny', 'nowhere.pth', **SMALL)


def test_a_foreign_backbone_builds_through_its_registry_scope():
    swin = build_backbone(dict(type='mmdet.SwinTransformer', embed_dims=32, depths=(1, 1, 1, 1),
                               num_heads=(2, 4, 8, 16), init_cfg=dict(type='Pretrained', checkpoint='nowhere.pth')))
    assert type(swin).__name__ == 'SwinTransformer' and swin.init_cfg is None  # no weights from the config


def test_a_classifier_checkpoint_loads_into_its_timm_model_and_the_backbone(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model('hmait_tiny', num_classes=3, **SMALL)
    # mmengine's layout of a TimmImageClassifier checkpoint: backbone.* under state_dict.
    path = tmp_path / 'epoch_1.pth'
    torch.save(dict(meta=dict(epoch=1), state_dict={f'backbone.{k}': v for k, v in source.state_dict().items()}),
               path)
    model = build_model(str(_classification_config(tmp_path / 'cls.py')), str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # The detection backbone has no head but a norm per output: strictly the file does not fit it, partially
    # it does.
    backbone = HMaiT(**SMALL)
    with pytest.raises(ValueError, match=r'does not fit the model \(HMaiT; \d+ of its tensors fit\): 6 missing from '
                                         r'the file: norm0\.weight.*; 2 unknown to the model: head\.fc\.weight'):
        load_weights(backbone, str(path))
    fit = load_weights(backbone, str(path), strict=False)
    assert fit.unexpected == ['head.fc.weight', 'head.fc.bias'] and fit.missing[0] == 'norm0.weight'
    assert torch.equal(backbone.layers[3].blocks[0].attn.qkv.weight, source.layers[3].blocks[0].attn.qkv.weight)


def test_a_checkpoint_of_another_width_is_refused_naming_shapes_even_partially(tmp_path):
    path = tmp_path / 'wide.pth'
    torch.save(HMaiT(**{**SMALL, 'embed_dims': 48}).state_dict(), path)
    model = HMaiT(**SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(ValueError, match=r'none of its tensors fits.*of another shape: patch_embed\.proj\.weight '
                                             r'\(file \(48, 3, 4, 4\), model \(32, 3, 4, 4\)\)'):
            load_weights(model, str(path), strict=strict)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), 'a refused file changes nothing'


def test_the_backbone_loader_names_shapes_when_nothing_matches(tmp_path):
    """The init_cfg loader of the detection backbone names the real cause (32 against 96 channels)."""
    path = tmp_path / 'demo.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in HMaiT(**SMALL).state_dict().items()}}, path)
    model = HMaiT(init_cfg=dict(type='Pretrained', checkpoint=str(path)), depths=(1, 1, 1, 1))
    with pytest.raises(RuntimeError, match=r'no parameter of .* matches the model: \d+ of another shape: patch_embed'
                                           r'\.proj\.weight \(file \(32, 3, 4, 4\), model \(96, 3, 4, 4\)\)'):
        model.init_weights()


def test_state_dict_fit_sorts_every_key():
    own = {'a': torch.zeros(2), 'b': torch.zeros(3), 'c': torch.zeros(1)}
    fit = state_dict_fit(own, {'a': torch.ones(2), 'b': torch.ones(4), 'd': torch.ones(1)})
    assert (fit.matched, fit.missing, fit.unexpected, fit.mismatched) == (['a'], ['c'], ['d'], [('b', (4,), (3,))])
    assert not fit.exact and fit.describe() == ('1 of another shape: b (file (4,), model (3,)); '
                                                '1 missing from the file: c; 1 unknown to the model: d')


def test_get_flops_refuses_an_unknown_model_in_one_line():
    proc = subprocess.run([sys.executable, 'tools/analysis/get_flops.py', '--timm-model', 'hmait_tinyy'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("get_flops: error: 'hmait_tinyy' is neither a config file (.py) nor a timm model; "
                               'similar: hmait_tiny')


def test_a_detection_config_counts_without_noise_on_stderr(tmp_path):
    """No pkg_resources deprecation warnings, no CUDA_HOME message on a CPU machine: stderr stays empty."""
    out = tmp_path / 'flops.json'
    config = CONFIGS / 'retinanet_hmait-t_fpn_1x_coco.py'
    proc = subprocess.run([sys.executable, 'tools/analysis/get_flops.py', str(config), '--shape', '128', '128',
                           '--backbone-only', '--json', str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr[-2000:]
    assert 'backbone' in proc.stdout and out.is_file()


def test_the_demo_comparison_builds_the_demo_network_three_ways(tmp_path):
    from hmait.models.layers import MaskedMultiheadAttention
    sys.path.insert(0, str(ROOT / 'tools' / 'analysis'))
    try:
        from demo_compare import MODELS, final_top1
    finally:
        sys.path.pop(0)
    masked = {}
    for name, config in MODELS.items():
        model = build_model(str(ROOT / config))
        assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 10), name
        layers = [m for m in model.modules() if isinstance(m, MaskedMultiheadAttention)]
        masked[name] = [m.num_masked_heads for m in layers]
    demo, every_global, swin = masked.values()
    assert demo == [2, 4, 3, 3, 0] and every_global == [0] * 5 and swin == []  # Swin has windows, not masks
    # The table reads the last validation top-1 that mmengine logged.
    log = tmp_path / 'run' / '20261205_000000' / 'vis_data' / 'scalars.json'
    log.parent.mkdir(parents=True)
    log.write_text('{"loss": 2.3, "lr": 0.001, "step": 10}\n{"accuracy/top1": 40.0, "step": 1}\n'
                   '{"accuracy/top1": 55.5, "step": 2}\n')
    assert final_top1(str(tmp_path / 'run')) == 55.5
