"""MaiT (monolithic): timm models, parameter counts, masking schemes, prefix tokens, soft masking."""
from pathlib import Path

import pytest
import timm
import torch
from mmengine.config import Config

import hmait  # noqa: F401  (registers the timm models)
from hmait.models import MaiT, masking_scheme

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
# Paper Table 7: 24 layers, LayerScale; parameters in millions.
TABLE7_PARAMS = {'mait_xtiny': 6.3, 'mait_tiny': 11.0, 'mait_xsmall': 24.5, 'mait_small': 43.3}


def tiny_mait(**kwargs) -> MaiT:
    args = dict(img_size=48, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return MaiT(**{**args, **kwargs})


@pytest.mark.parametrize('name', sorted(TABLE7_PARAMS))
def test_table7_parameter_counts(name):
    # Shapes only: the meta device skips the initialisation of up to 43 M parameters.
    with torch.device('meta'):
        model = timm.create_model(name)
    assert len(model.blocks) == 24
    assert all(block.ls1.gamma.shape == (model.embed_dim,) for block in model.blocks)  # LayerScale on
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(params - TABLE7_PARAMS[name]) <= 0.2, f'{name}: {params:.3f} M, paper {TABLE7_PARAMS[name]} M'


def test_registered_sizes_and_defaults():
    with torch.device('meta'):
        models = {n: timm.create_model(n, depth=12) for n in TABLE7_PARAMS}
        dims = {n: (m.embed_dim, m.num_heads) for n, m in models.items()}
        deep = timm.create_model('mait_small')
        shallow = timm.create_model('mait_tiny', depth=12)
    assert dims == {'mait_xtiny': (144, 3), 'mait_tiny': (192, 3), 'mait_xsmall': (288, 3),
                    'mait_small': (384, 6)}
    # 24 layers: Sch.2 with H - 1 = 5 masked heads up front and a constant drop path (Table 8).
    assert deep.masked_heads == [5] * 8 + [1] * 12 + [0] * 4
    assert {b.drop_path1.drop_prob for b in deep.blocks} == {0.1}
    # 12 layers: one masked head per layer and no LayerScale.
    assert shallow.masked_heads == [1] * 12 and isinstance(shallow.blocks[0].ls1, torch.nn.Identity)
    with pytest.raises(ValueError, match='depth must be 12 or 24'):
        timm.create_model('mait_tiny', depth=13)


@pytest.mark.parametrize('name,kwargs', [('mait_xtiny', {}), ('mait_small', dict(depth=12, distilled=True))])
def test_timm_model_forward_backward(name, kwargs):
    model = timm.create_model(name, num_classes=7, img_size=64, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_named_schemes():
    counts, modes = masking_scheme('sch2', 24, 3)
    assert counts == [2] * 8 + [1] * 12 + [0] * 4 and set(modes) == {'hard'}
    counts, modes = masking_scheme('sch3', 24, 3)
    assert counts == [3] * 21 + [0] * 3 and modes[:21] == ['soft'] * 21
    assert masking_scheme('sch1', 12, 6) == ([1] * 12, ['hard'] * 12)
    with pytest.raises(ValueError, match='defined for 24 layers'):
        masking_scheme('sch2', 12, 3)
    with pytest.raises(ValueError, match='one of'):
        masking_scheme('sch4', 24, 3)


def test_sch3_soft_layers_learn_alpha():
    # 4x4 grid: on a smaller one every token is a neighbour and alpha has nothing to scale.
    model = MaiT(img_size=64, embed_dim=24, depth=24, num_heads=3, num_classes=4, masked_heads='sch3')
    soft = [b.attn.soft_mask_logit for b in model.blocks]
    assert all(s is not None and s.shape == (3,) for s in soft[:21]) and all(s is None for s in soft[21:])
    assert model.blocks[0].attn.mode == 'soft'
    before = model.blocks[0].attn.alpha.detach().clone()
    # Adam: at initialisation the logits, and so alpha's gradients, are tiny; Adam's step is not.
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05, eps=1e-15)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert model.blocks[0].attn.soft_mask_logit.grad.abs().sum() > 0
    optimiser.step()
    after = model.blocks[0].attn.alpha.detach()
    assert torch.isfinite(after).all() and ((after > 0) & (after < 1)).all()
    assert not torch.allclose(before, after)


def test_hmait_soft_masking_is_finite_and_learns_alpha():
    model = timm.create_model('hmait_tiny', num_classes=3, mask_mode='soft', embed_dims=16,
                              depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), masked_heads=(2, 2, 1, 0))
    attn = model.layers[0].blocks[0].attn
    assert attn.mode == 'soft'
    before = attn.alpha.detach().clone()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05, eps=1e-15)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    out = model(x)
    assert torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert attn.soft_mask_logit.grad.abs().sum() > 0
    optimiser.step()
    assert not torch.allclose(before, attn.alpha.detach())


def _perturb_patch(x: torch.Tensor, row: int, col: int, patch: int = 16) -> torch.Tensor:
    y = x.clone()
    y[:, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] += 5.0
    return y


@torch.no_grad()
def test_class_token_sees_far_patches_strict_patch_tokens_do_not():
    # One layer, every head strictly masked, 6x6 grid: patch (0, 0) only sees its 3x3 box and the
    # class token; the class token sees everything.
    model = tiny_mait(img_size=96, depth=1, masked_heads=2, mask_mode='strict').eval()
    x = torch.randn(1, 3, 96, 96)
    a, b = model.forward_features(x), model.forward_features(_perturb_patch(x, 5, 5))
    assert torch.allclose(a[:, 1], b[:, 1], atol=1e-6)          # patch (0, 0)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)      # class token
    near = model.forward_features(_perturb_patch(x, 1, 1))
    assert not torch.allclose(a[:, 1], near[:, 1], atol=1e-4)   # a neighbour does reach patch (0, 0)
    # Hard masking (the paper's) keeps a route to far patches through the zero logits.
    hard = tiny_mait(img_size=96, depth=1, masked_heads=2, mask_mode='hard').eval()
    far = hard.forward_features(_perturb_patch(x, 5, 5))
    assert not torch.allclose(hard.forward_features(x)[:, 1], far[:, 1], atol=1e-6)


def test_distillation_token_and_timm_api():
    model = tiny_mait(distilled=True)
    assert model.num_prefix_tokens == 2
    assert {'dist_token', 'pos_embed', 'cls_token'} <= model.no_weight_decay()
    x = torch.randn(2, 3, 48, 48)
    model.eval()
    assert model(x).shape == (2, 5)
    model.train()
    model.set_distilled_training(True)
    logits, logits_dist = model(x)
    assert logits.shape == logits_dist.shape == (2, 5)
    model.eval()
    features = model.forward_features(x)
    assert features.shape == (2, 2 + 9, 32)
    assert model.forward_head(features, pre_logits=True).shape == (2, 32)
    final, inter = model.forward_intermediates(x, indices=[0, 1])
    assert final.shape == features.shape and [t.shape for t in inter] == [(2, 32, 3, 3)] * 2
    assert torch.allclose(final, features, atol=1e-5)
    only = model.forward_intermediates(x, indices=1, output_fmt='NLC', intermediates_only=True)
    assert [t.shape for t in only] == [(2, 9, 32)]
    model.reset_classifier(3, 'avg')
    assert model(x).shape == (2, 3) and model.head_dist.out_features == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    # Other image sizes resample the position embedding.
    assert model(torch.randn(1, 3, 80, 64)).shape == (1, 32)


def test_features_only_and_deit_weights():
    features = timm.create_model('mait_xtiny', depth=12, features_only=True, out_indices=(5, 11), img_size=64)
    assert [f.shape for f in features(torch.randn(1, 3, 64, 64))] == [(1, 144, 4, 4)] * 2
    # Parameter names follow timm's ViT: a DeiT-T state dict loads as it is into a 12-layer MaiT-T.
    deit = timm.create_model('deit_tiny_patch16_224', num_classes=10)
    mait = timm.create_model('mait_tiny', depth=12, num_classes=10)
    mait.load_state_dict(deit.state_dict(), strict=True)
    assert torch.equal(mait.blocks[3].attn.qkv.weight, deit.blocks[3].attn.qkv.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match='one entry per layer'):
        tiny_mait(masked_heads=[1, 1, 1])
    with pytest.raises(ValueError, match=r'masked_heads\[1\] must be an integer in \[0, num_heads=2\], got 3'):
        tiny_mait(masked_heads=[1, 3])
    with pytest.raises(ValueError, match='contradicts the named scheme'):
        MaiT(embed_dim=24, depth=24, num_heads=3, masked_heads='sch3', mask_mode='hard')
    with pytest.raises(ValueError, match=r"mask_mode\[1\] must be one of \('hard', 'soft', 'strict'\), got 'fuzzy'"):
        tiny_mait(mask_mode=['hard', 'fuzzy'])
    with pytest.raises(ValueError, match='divisible'):
        tiny_mait(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match='global_pool'):
        tiny_mait(global_pool='max')
    with pytest.raises(ValueError, match='in_chans=3'):
        tiny_mait()(torch.randn(1, 1, 48, 48))


def test_configs_follow_table8():
    expected = {'xt': ('mait_xtiny', 2e-3, 0.0, False), 't': ('mait_tiny', 2e-3, 0.0, False),
                'xs': ('mait_xsmall', 1e-3, 0.1, False), 's': ('mait_small', 1e-3, 0.1, True)}
    for size, (name, lr, drop_path, uniform) in expected.items():
        cfg = Config.fromfile(str(CONFIGS / f'mait_{size}_imagenet.py'))
        kwargs = cfg.model.model_kwargs
        assert cfg.model.model_name == name and kwargs.depth == 24 and kwargs.masked_heads == 'sch2'
        assert cfg.optim_wrapper.optimizer.lr == pytest.approx(lr)
        assert kwargs.drop_path_rate == drop_path and kwargs.get('drop_path_uniform', False) == uniform
        assert cfg.train_cfg.max_epochs == 400 and cfg.auto_scale_lr.base_batch_size == 1024
        assert cfg.param_scheduler[0].start_factor * lr == pytest.approx(1e-6)
