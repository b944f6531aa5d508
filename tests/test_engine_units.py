"""Unit tests of hmait.engine and the synthetic ImageNet generator (in-process, no training)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from helpers import python, run_tool, tool
from mmengine.config import Config
from mmengine.runner.checkpoint import CheckpointLoader, save_checkpoint

from hmait.data import generate_imagenet
from hmait.engine import (
    ATOMIC_BACKEND,
    AtomicLocalBackend,
    ImageFolderDataset,
    SeededSampler,
    TimmImageClassifier,
    TopKAccuracy,
    atomic_write_bytes,
    find_resume_checkpoint,
    install_weights_only_loading,
)
from hmait.engine import checkpoint as engine_checkpoint
from hmait.engine.launch import _replace_sync_bn, prepare_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('units') / 'imagenet'
    generate_imagenet(str(root), num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=5)
    return root


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob('*.JPEG')):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generator_is_deterministic_and_idempotent(data, tmp_path):
    again = tmp_path / 'again'
    summary = generate_imagenet(str(again), num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=5)
    assert summary['generated'] and _digest(again) == _digest(data)
    assert len(list((again / 'train').iterdir())) == 3 and len(list(again.rglob('*.JPEG'))) == 3 * 6
    # Same arguments: nothing is rewritten. Another seed: other images.
    assert not generate_imagenet(str(again), num_classes=3, train_per_class=4, val_per_class=2, size=32,
                                 seed=5)['generated']
    generate_imagenet(str(again), num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=6)
    assert _digest(again) != _digest(data)


def test_generator_refuses_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / 'mine.txt').write_text('x')
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        generate_imagenet(str(tmp_path))
    with pytest.raises(ValueError, match='num_classes'):
        generate_imagenet(str(tmp_path / 'x'), num_classes=1)


@pytest.mark.parametrize('fmt', ['coco', 'ade20k'])
def test_dense_generators_refuse_foreign_folders_and_keep_or_replace_their_own(tmp_path, fmt):
    """The same folder rules as the imagenet format: what they wrote is kept for the same arguments and
    replaced for others (no stale files), and a folder they did not write is refused."""
    from hmait.data.dense_synthetic import make_ade20k, make_coco
    make = make_coco if fmt == 'coco' else make_ade20k
    root = tmp_path / fmt
    first = make(str(root), num_train=3, num_val=1, image_size=(32, 48))
    files = sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file())
    assert first['generated'] and len(files) > 4
    assert not make(str(root), num_train=3, num_val=1, image_size=(32, 48))['generated']
    assert sorted(p.relative_to(root) for p in root.rglob('*') if p.is_file()) == files
    again = make(str(root), num_train=1, num_val=1, image_size=(32, 48))
    assert again['generated'] and len(list(Path(again['train_img']).iterdir())) == 1
    # A folder of the other format's data is this project's too: regenerated, without leftovers.
    other = make_ade20k if fmt == 'coco' else make_coco
    other(str(root), num_train=1, num_val=1, image_size=(32, 48))
    left = {p.relative_to(root).parts[0] for p in root.iterdir()}
    assert left == ({'images', 'annotations', '.hmait-synthetic.json'} if fmt == 'coco'
                    else {'train2017', 'val2017', 'annotations', '.hmait-synthetic.json'})
    (tmp_path / 'foreign').mkdir()
    (tmp_path / 'foreign' / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='foreign exists, is not empty and was not written by this generator'):
        make(str(tmp_path / 'foreign'))
    proc = run_tool([python(), tool('generate_demo_data.py'), fmt, str(tmp_path / 'foreign')], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert 'not written by this generator' in proc.stderr


def test_dataset_reads_split_with_timm_transform(data):
    ds = ImageFolderDataset(str(data), 'val', transform=dict(input_size=24, is_training=False, crop_pct=1.0))
    assert ds.classes == ('c000_disc', 'c001_triangle', 'c002_ring') and len(ds) == 6
    item = ds[5]
    assert item['inputs'].shape == (3, 24, 24) and item['data_samples'] == 2


def test_seeded_augmentation_depends_on_seed_only(data):
    transform = dict(input_size=32, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25)
    ds = ImageFolderDataset(str(data), 'train', transform=transform)
    torch.manual_seed(0)
    a = ds[(1, 1234)]['inputs']
    torch.manual_seed(99)  # the global stream must not matter, and must be left as it was
    state = torch.get_rng_state()
    b = ds[(1, 1234)]['inputs']
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a, ds[(1, 4321)]['inputs'])
    sampler = SeededSampler(ds, shuffle=True, seed=7)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for i, _ in first) == list(range(len(ds)))
    assert {s for _, s in first}.isdisjoint({s for _, s in second}), 'new augmentation every epoch'


def test_missing_data_root_and_empty_class_folder(tmp_path, data):
    with pytest.raises(FileNotFoundError, match=r"data_root '.*nowhere' does not exist.*generate_demo_data\.py"):
        ImageFolderDataset(str(tmp_path / 'nowhere'))
    bad = tmp_path / 'bad'
    (bad / 'train' / 'cat').mkdir(parents=True)
    (bad / 'train' / 'dog').mkdir()
    (bad / 'train' / 'dog' / 'a.JPEG').write_bytes((data / 'train' / 'c000_disc' / 'train_000_00000.JPEG').read_bytes())
    with pytest.raises(ValueError, match=f"class folder '{bad / 'train' / 'cat'}' holds no images"):
        ImageFolderDataset(str(bad))
    with pytest.raises(FileNotFoundError, match='split folder'):
        ImageFolderDataset(str(bad), 'val')


def test_corrupt_image_is_skipped_with_warning_or_raises(tmp_path, data):
    root = tmp_path / 'corrupt'
    for label in ('a', 'b'):
        (root / 'train' / label).mkdir(parents=True)
        (root / 'train' / label / 'ok.JPEG').write_bytes(
            (data / 'train' / 'c000_disc' / 'train_000_00000.JPEG').read_bytes())
    broken = root / 'train' / 'a' / 'broken.JPEG'  # sorts before ok.JPEG: sample 0
    broken.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    ds = ImageFolderDataset(str(root), transform=None)
    with pytest.warns(RuntimeWarning, match=f'skipping unreadable image {broken}'):
        item = ds[0]
    assert item['inputs'].shape == (3, 32, 32)
    strict = ImageFolderDataset(str(root), transform=None, on_corrupt='error')
    with pytest.raises(RuntimeError, match=f'cannot read image {broken}'):
        strict[0]
    with pytest.raises(ValueError, match='on_corrupt'):
        ImageFolderDataset(str(root), on_corrupt='ignore')


def test_topk_accuracy():
    metric = TopKAccuracy(topk=(1, 2))
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    metric.process({}, [dict(pred_score=s, gt_label=y) for s, y in zip(scores, [0, 1, 1, 0])])
    assert metric.compute_metrics(metric.results) == {'top1': 25.0, 'top2': 75.0}
    with pytest.raises(ValueError, match='topk'):
        TopKAccuracy(topk=(0,))


def test_classifier_losses_and_predict():
    kwargs = dict(embed_dims=16, depths=(1, 1), num_heads=(1, 2), masked_heads=(1, 1), strides=(4, 2))
    model = TimmImageClassifier('hmait_tiny', num_classes=4, model_kwargs=kwargs,
                                mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0), label_smoothing=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert type(model.backbone).__name__ == 'HMaiTClassifier'
    assert type(model.criterion).__name__ == 'SoftTargetCrossEntropy'
    loss = model(x, y, mode='loss')['loss']
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match='even batch'):
        model(x[:3], y[:3], mode='loss')
    preds = model(x, y, mode='predict')
    assert len(preds) == 4 and preds[0]['pred_score'].shape == (4,) and preds[3]['gt_label'] == 3
    plain = TimmImageClassifier('hmait_tiny', num_classes=4, model_kwargs=kwargs, label_smoothing=0.1)
    assert type(plain.criterion).__name__ == 'LabelSmoothingCrossEntropy'


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / 'epoch_1.pth'
    atomic_write_bytes(str(target), b'complete checkpoint')

    def failing_fsync(fd):  # a crash between writing and renaming
        raise OSError('disk full')

    monkeypatch.setattr(engine_checkpoint.os, 'fsync', failing_fsync)
    with pytest.raises(OSError, match='disk full'):
        AtomicLocalBackend().put(b'half a checkp', str(target))
    assert target.read_bytes() == b'complete checkpoint'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['epoch_1.pth'], 'temporary file removed'


def test_mmengine_saves_atomically_and_loads_weights_only(tmp_path):
    install_weights_only_loading()  # what tools/train.py and tools/test.py do first
    path = tmp_path / 'ckpt.pth'
    save_checkpoint({'state_dict': {'w': torch.ones(2)}, 'meta': {'epoch': 1}}, str(path),
                    backend_args=dict(backend=ATOMIC_BACKEND))
    loaded = CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    assert torch.equal(loaded['state_dict']['w'], torch.ones(2))
    evil = tmp_path / 'evil.pth'
    torch.save({'state_dict': {}, 'meta': {'hook': os.getcwd, 'x': _Opaque()}}, str(evil))
    with pytest.raises(RuntimeError, match=f'refusing to load checkpoint {evil}'):
        CheckpointLoader.load_checkpoint(str(evil), map_location='cpu')


class _Opaque:
    pass


def test_find_resume_checkpoint_falls_back_when_pointer_is_bad(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) is None
    for n in (1, 2):
        (tmp_path / f'epoch_{n}.pth').write_bytes(b'x')
        os.utime(tmp_path / f'epoch_{n}.pth', (n, n))
    (tmp_path / 'last_checkpoint').write_text('')  # truncated pointer
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_2.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'epoch_1.pth'))
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path / 'epoch_1.pth')


def test_config_preparation_without_cuda(tmp_path):
    cfg = dict(model=dict(backbone=dict(norm_cfg=dict(type='SyncBN')), heads=[dict(norm_cfg=dict(type='SyncBN'))]))
    assert _replace_sync_bn(cfg) == 2 and cfg['model']['heads'][0]['norm_cfg']['type'] == 'BN'
    config = tmp_path / 'c.py'
    config.write_text("model = dict(norm_cfg=dict(type='SyncBN'))\n"
                      "default_hooks = dict(checkpoint=dict(type='CheckpointHook', interval=1))\n")
    loaded = prepare_config(str(config), None, str(tmp_path / 'w'), 'none')
    assert loaded.default_hooks.checkpoint.backend_args == dict(backend=ATOMIC_BACKEND)
    if not torch.cuda.is_available():
        assert loaded.model.norm_cfg.type == 'BN'
    config.write_text('cpu_threads = 0\n')
    with pytest.raises(ValueError, match='cpu_threads must be a positive integer'):
        prepare_config(str(config), None, None, 'none')
    with pytest.raises(FileNotFoundError, match='config file .*missing.py. does not exist'):
        prepare_config(str(tmp_path / 'missing.py'), None, None, 'none')


@pytest.mark.parametrize('name', ['hmait_t_imagenet', 'hmait_s_imagenet'])
def test_imagenet_configs_follow_the_swin_recipe(name):
    cfg = Config.fromfile(str(ROOT / 'configs' / f'{name}.py'))
    assert cfg.train_cfg.max_epochs == 300 and cfg.auto_scale_lr == dict(base_batch_size=1024, enable=True)
    assert cfg.optim_wrapper.optimizer.lr == 1e-3 and cfg.optim_wrapper.optimizer.weight_decay == 0.05
    assert cfg.optim_wrapper.clip_grad.max_norm == 5.0
    assert [s.type for s in cfg.param_scheduler] == ['LinearLR', 'CosineAnnealingLR']
    assert cfg.param_scheduler[0].end == 20 and cfg.param_scheduler[1].end == 300
    assert cfg.model.mixup.mixup_alpha == 0.8 and cfg.model.mixup.cutmix_alpha == 1.0
    assert cfg.model.label_smoothing == 0.1
    transform = cfg.train_dataloader.dataset.transform
    assert transform.auto_augment == 'rand-m9-mstd0.5-inc1' and transform.re_prob == 0.25
    assert cfg.model.model_kwargs.drop_path_rate == (0.2 if name == 'hmait_t_imagenet' else 0.3)
    assert cfg.default_hooks.checkpoint.save_best == 'accuracy/top1'


class _Stage:
    """What ``_run`` needs of a Runner: one stage method that finishes or fails."""

    def __init__(self, fail: bool):
        self.fail = fail

    def train(self):
        if self.fail:
            raise RuntimeError('the stage failed')
        return 'done'


@pytest.mark.parametrize('fail', [False, True])
def test_run_destroys_the_process_group_after_the_stage(monkeypatch, tmp_path, fail):
    """A rank that exits with its gloo group alive can abort at shutdown, so ``_run`` tears it down."""
    import torch.distributed as dist

    from hmait.engine import launch

    store = dist.FileStore(str(tmp_path / 'store'), 1)
    dist.init_process_group('gloo', store=store, rank=0, world_size=1)
    try:
        monkeypatch.setattr(launch, '_build_runner', lambda cfg: _Stage(fail))
        if fail:
            with pytest.raises(RuntimeError, match='the stage failed'):
                launch._run(Config(), 'train')
        else:
            assert launch._run(Config(), 'train') == 'done'
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
