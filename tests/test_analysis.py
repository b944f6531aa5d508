"""ALS, the quick mask search and cross-layer similarity: hand-computed cases, models and the tools."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

import hmait  # noqa: F401  (registers the timm models)
from hmait.analysis import (
    ALSResult,
    assign_masks,
    calibrate_masks,
    compute_als,
    head_als,
    layer_similarity,
    search_step,
)
from hmait.analysis.tooling import prepare
from hmait.builder import build_model, load_weights
from hmait.data.imagenet_synthetic import generate_imagenet
from hmait.models import MaiT
from hmait.ops import dense_attention_map

ROOT = Path(__file__).resolve().parents[1]
# 3x3 grid behind one class token: neighbours (self and class token included) of the 4 corners,
# 4 edges and the centre are 5, 7 and 10 of N = 10 tokens.
UNIFORM_ALS_3X3 = (4 * 5 + 4 * 7 + 10) / (9 * 10)


def zero_qk(model: nn.Module) -> nn.Module:
    """Zero the query and key projections: every logit is 0, so unmasked attention is uniform."""
    for block in model.blocks:
        dim = block.attn.qkv.in_features
        with torch.no_grad():
            block.attn.qkv.weight[:2 * dim] = 0
            block.attn.qkv.bias[:2 * dim] = 0
    return model


def test_head_als_hand_computed():
    # 1x4 grid, no prefix: neighbours of tokens 0..3 are {0,1}, {0,1,2}, {1,2,3}, {2,3}.
    maps = torch.tensor([[0.5, 0., 0., 0.5],     # half on itself, half on far token 3 -> 0.5
                         [0., 0., 0., 1.],       # all on far token 3 -> 0
                         [.25, .25, .25, .25],   # uniform: 3 of 4 tokens are neighbours -> 0.75
                         [0., 0., 1., 0.]])      # all on its neighbour 2 -> 1
    als = head_als(maps[None, None], (1, 4), mask_size=3)
    assert als.shape == (1, 1) and als.item() == pytest.approx((0.5 + 0 + 0.75 + 1) / 4)
    # A class token counts as a neighbour of every patch (it is in the paper's mask M); its own row is
    # not a patch row and is ignored.
    with_prefix = torch.zeros(1, 1, 5, 5)
    with_prefix[..., 0, 4] = 1.            # class-token row: not a patch token
    with_prefix[..., 1:, 0] = 1.           # every patch attends only to the class token
    assert head_als(with_prefix, (1, 4), num_prefix_tokens=1).item() == pytest.approx(1.)
    # Uniform attention: ALS = mean over patches of n_i / N.
    uniform = torch.full((2, 3, 10, 10), 0.1)
    assert torch.allclose(head_als(uniform, (3, 3), num_prefix_tokens=1), torch.tensor(UNIFORM_ALS_3X3))
    # Strict masking puts all attention inside the mask: ALS = 1 whatever q and k are.
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    strict = dense_attention_map(q, k, (3, 3), mode='strict', num_prefix_tokens=1)
    assert torch.allclose(head_als(strict, (3, 3), num_prefix_tokens=1), torch.ones(2, 3))
    with pytest.raises(ValueError, match='maps must have shape'):
        head_als(uniform, (3, 4), num_prefix_tokens=1)


def test_compute_als_known_values_on_a_model():
    model = zero_qk(MaiT(img_size=48, embed_dim=32, depth=3, num_heads=2, num_classes=3,
                         masked_heads=[2, 1, 0], mask_mode=['strict', 'hard', 'hard']))
    result = compute_als(model, torch.randn(3, 3, 48, 48))
    assert result.layers == ['blocks.0.attn', 'blocks.1.attn', 'blocks.2.attn']
    assert result.masked_heads == [2, 1, 0] and result.mask_modes == ['strict', 'hard', 'none']
    assert result.num_images == 3 and result.tokens == [9, 9, 9]
    assert result.scores[0] == pytest.approx([1., 1.])
    # Zero logits: the hard-masked head and the global head are both uniform.
    assert result.scores[1] == pytest.approx([UNIFORM_ALS_3X3] * 2)
    assert result.scores[2] == pytest.approx([UNIFORM_ALS_3X3] * 2)
    assert result.head0() == pytest.approx([1., UNIFORM_ALS_3X3, UNIFORM_ALS_3X3])


def test_compute_als_matches_maps_of_captured_inputs_and_leaves_model_alone():
    torch.manual_seed(0)
    model = MaiT(img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=3, masked_heads=1,
                 distilled=True).train()
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # A loader-like iterable of (images, labels) batches.
    result = compute_als(model, [(x[:1], torch.tensor([0])), (x[1:], torch.tensor([1]))])
    block = model.blocks[0]
    with torch.no_grad():
        tokens, hw = model._embed(x)
        maps = block.attn.attention_maps(block.norm1(tokens), hw)
    expected = head_als(maps, hw, num_prefix_tokens=2).mean(0)
    assert result.scores[0] == pytest.approx(expected.tolist(), abs=1e-5)
    assert model.training and all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_hmait_als_similarity_and_soft_alpha():
    model = timm.create_model('hmait_tiny', num_classes=3, mask_mode='soft', embed_dims=16,
                              depths=(2, 1, 2, 1), num_heads=(2, 2, 4, 4), masked_heads=(2, 1, 1, 0))
    x = torch.randn(2, 3, 32, 32)
    result = compute_als(model, x)
    assert len(result.layers) == 6 and result.tokens == [64, 64, 16, 4, 4, 1]
    assert [len(s) for s in result.scores] == [2, 2, 2, 4, 4, 4]
    assert all(0. <= v <= 1. for s in result.scores for v in s)
    assert result.alpha == {name: [pytest.approx(0.5)] * m
                            for name, m in zip(result.layers, result.masked_heads) if m}
    # Chunking the dense maps image by image gives the same scores.
    chunked = compute_als(model, x, max_map_bytes=1)
    assert chunked.scores == [pytest.approx(s) for s in result.scores]

    sim = layer_similarity(model, x, head=0)
    matrix = torch.tensor([[math.nan if v is None else v for v in row] for row in sim.to_dict()['matrix']])
    assert torch.allclose(matrix.diagonal(), torch.ones(6), atol=1e-5)
    assert torch.isnan(matrix[0, 2]) and torch.isnan(matrix[2, 5])   # different stages: no comparison
    assert torch.isfinite(matrix[0, 1]) and torch.isfinite(matrix[3, 4]) and matrix[0, 1] == matrix[1, 0]
    # Head 3 only exists in the last three blocks.
    sim3 = torch.tensor(layer_similarity(model, x, head=3).matrix)
    assert torch.isnan(sim3[:3]).all() and sim3[3, 3] == pytest.approx(1., abs=1e-5)


def test_similarity_hand_computed():
    model = zero_qk(MaiT(img_size=48, embed_dim=32, depth=2, num_heads=2, num_classes=3, masked_heads=[2, 0],
                         mask_mode='strict'))
    sim = layer_similarity(model, torch.randn(2, 3, 48, 48), head=0)
    # Row t of the uniform map is 1/N everywhere, of the strict map 1/n_t on its n_t neighbours:
    # cosine sqrt(n_t / N); the class token's rows are both uniform (cosine 1).
    expected = (1 + 4 * math.sqrt(5 / 10) + 4 * math.sqrt(7 / 10) + 1) / 10
    assert sim.matrix[0][1] == pytest.approx(expected, abs=1e-5)
    assert sim.matrix[0][0] == pytest.approx(1.) and sim.matrix[1][1] == pytest.approx(1.)


def test_search_assignment_and_calibration():
    # Assignment: > upper -> all heads, [lower, upper] -> one, < lower -> none.
    heads = [3, 6, 3, 3, 3, 3, 3]
    assert assign_masks([0.9, 0.66, 0.65, 0.5, 0.35, 0.349, 0.], heads) == [3, 6, 1, 1, 1, 0, 0]
    assert assign_masks([0.9, 0.5, 0.2], [3, 3, 3], upper=0.95, lower=0.1) == [1, 1, 1]
    # Calibration: fully masked layers keep the heads with ALS >= lower; others are unchanged.
    assert calibrate_masks([[0.8, 0.4, 0.2], [0.9, 0.1, 0.1], [0.1, 0.1, 0.1], [0.2, 0.9, 0.9]],
                           [3, 3, 1, 0]) == [2, 1, 1, 0]
    assert calibrate_masks([[0.8, 0.4, 0.2]], [3], lower=0.5) == [1]

    def als(masked, scores):
        return ALSResult(layers=[f'blocks.{i}.attn' for i in range(len(scores))], num_heads=[3] * len(scores),
                         masked_heads=masked, mask_modes=['hard'] * len(scores), mask_sizes=[3] * len(scores),
                         tokens=[196] * len(scores), scores=scores, num_images=1)

    first = search_step(als([1, 1, 1], [[0.8, 0.1, 0.1], [0.5, 0.1, 0.1], [0.2, 0.1, 0.1]]))
    assert first.stage == 'assign' and first.masked_heads == [3, 1, 0] and first.before == [1, 1, 1]
    second = search_step(als([3, 1, 0], [[0.9, 0.6, 0.3], [0.5, 0.1, 0.1], [0.2, 0.1, 0.1]]))
    assert second.stage == 'calibrate' and second.masked_heads == [2, 1, 0]
    forced = search_step(als([3, 1, 0], [[0.9, 0.6, 0.3], [0.7, 0.1, 0.1], [0.2, 0.1, 0.1]]), stage='assign')
    assert forced.masked_heads == [3, 3, 0]
    with pytest.raises(ValueError, match='thresholds must satisfy'):
        assign_masks([0.5], [3], upper=0.3, lower=0.6)
    with pytest.raises(ValueError, match='stage must be one of'):
        search_step(als([1], [[0.5, 0.5, 0.5]]), stage='guess')


def test_bad_inputs():
    with pytest.raises(ValueError, match='no attention layers'):
        compute_als(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8))
    model = MaiT(img_size=32, embed_dim=16, depth=1, num_heads=2, num_classes=2)
    with pytest.raises(ValueError, match='head=2 does not exist'):
        layer_similarity(model, torch.randn(1, 3, 32, 32), head=2)
    with pytest.raises(ValueError, match='images is empty'):
        compute_als(model, [])
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'):
        compute_als(model, torch.randn(3, 32, 32))


def _write_config(path: Path, **model_kwargs) -> Path:
    # A narrow MaiT-XT (12 layers of width 48) keeps every build and tool run fast.
    kwargs = {'depth': 12, 'img_size': 48, 'embed_dim': 48, **model_kwargs}
    path.write_text("model = dict(type='TimmImageClassifier', model_name='mait_xtiny', num_classes=3, "
                    f'model_kwargs={kwargs!r})\n')
    return path


def _write_checkpoint(config: Path, path: Path) -> Path:
    # The layout mmengine's Runner writes for TimmImageClassifier: backbone.* keys under state_dict.
    model = build_model(str(config))
    state_dict = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    torch.save(dict(meta=dict(epoch=1), state_dict=state_dict), path)
    return path


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('analysis')
    generate_imagenet(str(root / 'data'), num_classes=3, train_per_class=1, val_per_class=2, size=48)
    config = _write_config(root / 'mait_cfg.py', masked_heads=1)
    return root, config, _write_checkpoint(config, root / 'epoch_1.pth')


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'analysis' / tool), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_als_tool(trained):
    root, config, checkpoint = trained
    out = root / 'als_out'
    proc = _run('als.py', str(config), str(checkpoint), '--data', str(root / 'data'), '--out-dir', str(out),
                '--num-images', '4', '--batch-size', '2')
    report = json.loads((out / 'als.json').read_text())
    assert report['num_images'] == 4 and report['img_size'] == 48
    als = report['als']
    assert len(als['layers']) == 12 and als['masked_heads'] == [1] * 12
    assert all(len(s) == 3 and all(0 <= v <= 1 for v in s) for s in als['scores'])
    assert (out / 'als.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert len(re.findall(r'\[  hard\]', proc.stdout)) == 12 and 'wrote' in proc.stdout


def test_mask_search_tool(trained):
    root, config, checkpoint = trained
    # Every ALS is above 0: with both thresholds at 0 the assignment masks every head of every layer.
    proc = _run('mask_search.py', str(config), str(checkpoint), '--data', str(root / 'data'), '--upper', '0',
                '--lower', '0', '--num-images', '2', '--json', str(root / 'step.json'))
    assert 'model = dict(model_kwargs=dict(masked_heads=[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]))' in proc.stdout
    assert json.loads((root / 'step.json').read_text())['step']['stage'] == 'assign'


def test_layer_similarity_tool(trained):
    root, config, checkpoint = trained
    out = root / 'sim' / 'head1.png'
    _run('layer_similarity.py', str(config), str(checkpoint), '--data', str(root / 'data'), '--head', '1',
         '--out', str(out), '--num-images', '2')
    assert out.read_bytes()[:4] == b'\x89PNG'
    matrix = json.loads(out.with_suffix('.json').read_text())['similarity']['matrix']
    assert len(matrix) == 12 and all(row[i] == pytest.approx(1., abs=1e-4) for i, row in enumerate(matrix))


def test_analysis_runs_at_the_size_the_config_evaluates_at(trained, tmp_path):
    """Without --img-size the tools take the config's test input size (the demo's 64 px), not 224."""
    root, config, checkpoint = trained
    at_32 = tmp_path / 'at_32.py'
    at_32.write_text(config.read_text() + 'test_dataloader = dict(dataset=dict(transform=dict(input_size=32)))\n')
    _, loader, info = prepare(str(at_32), str(checkpoint), str(root / 'data'), None, 2, 2)
    assert info['img_size'] == 32 and next(iter(loader))[0].shape[-2:] == (32, 32)
    assert prepare(str(config), str(checkpoint), str(root / 'data'), None, 2, 2)[2]['img_size'] == 48  # as built


def test_analysis_tools_refuse_bad_input_in_one_line(trained, tmp_path):
    root, config, checkpoint = trained
    data = tmp_path / 'data'
    shutil.copytree(root / 'data', data)
    broken = sorted((data / 'val').glob('*/*'))[0]
    broken.write_bytes(b'not an image')
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'encoder.weight': torch.zeros(3)}}, other)
    for tool, args, message in (
            ('als.py', [str(config), str(checkpoint), '--data', str(data)],
             f'cannot read image {str(broken)!r}'),
            ('als.py', [str(config), str(other), '--data', str(root / 'data')],
             f'checkpoint {other} does not fit the model (MaiT; none of its tensors fits)'),
            ('mask_search.py', [str(config), str(checkpoint), '--data', str(tmp_path / 'nowhere')],
             f"--data {str(tmp_path / 'nowhere')!r} is not a folder"),
            ('layer_similarity.py', [str(config), str(checkpoint), '--data', str(root / 'data'), '--num-images', '0'],
             'num_images must be a positive integer')):
        proc = subprocess.run([sys.executable, str(ROOT / 'tools' / 'analysis' / tool), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 2, (tool, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f'{tool[:-3]}: error: ') and message in lines[0], proc.stderr


def test_tool_inputs_that_do_not_fit(trained, tmp_path):
    root, config, checkpoint = trained
    soft = _write_config(tmp_path / 'soft.py', masked_heads=1, mask_mode='soft')
    with pytest.raises(ValueError, match='does not fit the model.*different mask modes.*'
                                         'missing from the file: blocks.0.attn'):
        prepare(str(soft), str(checkpoint), str(root / 'data'), None, 2, 2)
    wider_head = tmp_path / 'classes.py'
    wider_head.write_text(config.read_text().replace('num_classes=3', 'num_classes=5'))
    with pytest.raises(ValueError, match=r'2 of another shape: head\.weight \(file \(3, 48\), model \(5, 48\)\)'):
        prepare(str(wider_head), str(checkpoint), str(root / 'data'), None, 2, 2)
    with pytest.raises(FileNotFoundError, match='--data'):
        prepare(str(config), str(checkpoint), str(tmp_path / 'nowhere'), None, 2, 2)
    not_timm = tmp_path / 'det.py'
    not_timm.write_text("model = dict(type='MaskRCNN', backbone=dict(type='HMaiT'))\n")
    with pytest.raises(ValueError, match="expected a classification config.*its model is 'MaskRCNN'"):
        build_model(str(not_timm), part='classifier')
    model = build_model(str(config))
    with pytest.raises(FileNotFoundError, match='checkpoint .*missing.pth. does not exist'):
        load_weights(model, str(tmp_path / 'missing.pth'))
