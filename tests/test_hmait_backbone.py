"""HMaiT backbone: the mmdet/mmseg Swin contract, checkpoints, and the timm interface."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import hmait  # noqa: F401  (registers the models)
from hmait.models import HMaiT, MaskedMultiheadAttention, convert_swin_state_dict
from hmait.ops import dense_masked_attention
from hmait.ops.backends import choose_global

SMALL = dict(depths=(1, 1, 1, 1), drop_path_rate=0.)


def _features(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('size,expected', [
    ((512, 512), [(96, 128, 128), (192, 64, 64), (384, 32, 32), (768, 16, 16)]),
    ((511, 511), [(96, 128, 128), (192, 64, 64), (384, 32, 32), (768, 16, 16)]),
    ((112, 137), [(96, 28, 35), (192, 14, 18), (384, 7, 9), (768, 4, 5)]),
])
def test_output_shapes_for_any_input_size(size, expected):
    outs = _features(HMaiT(**SMALL), torch.randn(1, 3, *size))
    assert isinstance(outs, tuple)
    assert [tuple(o.shape[1:]) for o in outs] == expected
    assert all(torch.isfinite(o).all() for o in outs)


def test_out_indices_and_per_output_norms():
    model = HMaiT(out_indices=(1, 3), **SMALL)
    assert hasattr(model, 'norm1') and hasattr(model, 'norm3') and not hasattr(model, 'norm0')
    outs = _features(model, torch.randn(2, 3, 64, 64))
    assert [o.shape for o in outs] == [(2, 192, 8, 8), (2, 768, 2, 2)]


def test_tiny_and_small_presets_match_swin_parameter_layout():
    for arch, swin in (('tiny', 'swin_tiny_patch4_window7_224'), ('small', 'swin_small_patch4_window7_224')):
        ours = timm.create_model(f'hmait_{arch}')
        ref = timm.create_model(swin)
        ours_keys = set(ours.state_dict())
        ref_keys = {k for k in ref.state_dict() if 'relative_position' not in k and 'attn_mask' not in k}
        assert ours_keys == {k.replace('norm.', 'norm3.') if k.startswith('norm.') else k for k in ref_keys}
        n_ours = sum(p.numel() for p in ours.parameters())
        n_ref = sum(p.numel() for p in ref.parameters())
        # Swin's only extra parameters are the relative position bias tables.
        tables = sum(p.numel() for k, p in ref.named_parameters() if 'relative_position_bias_table' in k)
        assert n_ours == n_ref - tables
    assert HMaiT(arch='tiny').masked_heads == (3, 6, 4, 0)
    assert HMaiT(arch='small').depths == (2, 2, 18, 2)


def test_masked_heads_follow_the_configuration():
    model = HMaiT(masked_heads=(3, 2, 1, 0), mask_mode='strict', mask_size=5, **SMALL)
    attns = [b.attn for stage in model.layers for b in stage.blocks]
    assert [a.num_masked_heads for a in attns] == [3, 2, 1, 0]
    assert {a.mode for a in attns} == {'strict'} and {a.mask_size for a in attns} == {5}


@pytest.mark.parametrize('mode', ['hard', 'soft', 'strict'])
def test_attention_module_equals_dense_reference(mode):
    torch.manual_seed(0)
    attn = MaskedMultiheadAttention(24, num_heads=4, num_masked_heads=2, mode=mode, num_prefix_tokens=1).double()
    x = torch.randn(2, 1 + 5 * 6, 24, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 31, 3, 4, 6).permute(2, 0, 3, 1, 4)
    masked = dense_masked_attention(q[:, :2], k[:, :2], v[:, :2], (5, 6), 3, mode, attn.alpha, 1)
    plain = ((q[:, 2:] @ k[:, 2:].transpose(-2, -1)) * 6 ** -0.5).softmax(-1) @ v[:, 2:]
    expected = attn.proj(torch.cat([masked, plain], 1).transpose(1, 2).reshape(2, 31, 24))
    assert torch.allclose(attn(x, (5, 6)), expected, atol=1e-12)


def test_no_masked_heads_equals_swin_with_global_windows():
    """masked_heads=(0,0,0,0) is plain global attention: identical to timm's Swin whose windows cover
    every stage (no shift), once Swin's relative position bias is zero and its weights are converted."""
    torch.manual_seed(0)
    swin = timm.create_model('swin_tiny_patch4_window7_224', img_size=64, window_size=16, depths=(1, 1, 2, 1))
    for name, p in swin.named_parameters():
        if 'relative_position_bias_table' in name:
            p.data.zero_()
    ours = timm.create_model('hmait_tiny', depths=(1, 1, 2, 1), masked_heads=(0, 0, 0, 0))
    converted, dropped = convert_swin_state_dict(swin.state_dict())
    assert ours.load_state_dict(converted, strict=True)
    assert dropped and all('relative_position' in k for k in dropped)
    x = torch.randn(2, 3, 64, 64)
    swin.eval()
    ours.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), swin(x), atol=1e-4)
    # and with masks on, the same weights give a different function
    masked = timm.create_model('hmait_tiny', depths=(1, 1, 2, 1))
    masked.load_state_dict(converted)
    masked.eval()
    with torch.no_grad():
        assert not torch.allclose(masked(x), swin(x), atol=1e-3)


@pytest.mark.parametrize('mode', ['hard', 'soft', 'strict'])
def test_every_mode_gives_finite_outputs_and_gradients(mode):
    model = HMaiT(mask_mode=mode, **SMALL)
    model.train()
    outs = model(torch.randn(2, 3, 67, 45))
    sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if mode == 'soft':
        alphas = [b.attn.alpha for s in model.layers for b in s.blocks if b.attn.num_masked_heads]
        assert all(((a > 0) & (a < 1)).all() for a in alphas)
        assert model.layers[0].blocks[0].attn.soft_mask_logit.grad.abs().sum() > 0


@pytest.mark.parametrize('frozen_stages', [-1, 0, 1, 2, 4])
def test_frozen_stages(frozen_stages):
    model = HMaiT(frozen_stages=frozen_stages, **SMALL)
    model.train()
    if frozen_stages >= 0:
        assert not model.patch_embed.training
        assert all(not p.requires_grad for p in model.patch_embed.parameters())
    for i, stage in enumerate(model.layers):
        frozen = i < frozen_stages
        for block in stage.blocks:
            assert block.training is not frozen
            assert all(p.requires_grad is not frozen for p in block.parameters())
        norm = getattr(model, f'norm{i}')
        assert all(p.requires_grad is not frozen for p in norm.parameters())
        # the patch merging that closes a frozen stage (it opens stage i here) is frozen with it
        if i > 0:
            assert all(p.requires_grad is not (i - 1 < frozen_stages) for p in stage.downsample.parameters())
    if frozen_stages == 4:
        assert not any(p.requires_grad for p in model.parameters())
    if frozen_stages == -1:
        assert all(p.requires_grad for p in model.parameters())


def test_with_cp_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = HMaiT(**SMALL)
    cp = HMaiT(with_cp=True, **SMALL)
    cp.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 48)
    results = []
    for model in (plain, cp):
        model.train()
        sum(o.sum() for o in model(x)).backward()
        results.append([p.grad.clone() for p in model.parameters()])
    assert all(cp.layers[0].blocks[0].with_cp for _ in [0])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)


def test_stochastic_depth_is_linear():
    model = HMaiT(depths=(2, 2, 6, 2), drop_path_rate=0.3)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.
             for s in model.layers for b in s.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3)
    steps = [b - a for a, b in zip(rates, rates[1:])]
    assert all(s == pytest.approx(0.3 / 11) for s in steps)


@pytest.mark.parametrize('kwargs,match', [
    (dict(masked_heads=(4, 6, 4, 0)), r'masked_heads\[0\] must be an integer in \[0, num_heads\[0\]=3\], got 4'),
    (dict(masked_heads=(3, 6, 4)), 'masked_heads must have one entry per stage'),
    (dict(num_heads=(3, 6, 12)), 'num_heads must have one entry per stage'),
    (dict(mask_size=4), 'mask_size must be a positive odd integer'),
    (dict(embed_dims=100), 'num_heads'),
    (dict(arch='huge'), 'arch must be one of'),
    (dict(out_indices=(4,)), 'out_indices must be stage indices'),
    (dict(frozen_stages=5), r'frozen_stages must be an integer in \[-1, 4\], got 5'),
    (dict(strides=(4, 2, 2, 1)), 'strides must be'),
    (dict(norm_cfg=dict(type='BN')), 'norm_cfg type must be one of'),
    (dict(act_cfg=dict(type='Swish2')), 'act_cfg type must be one of'),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HMaiT(**kwargs)


def test_wrong_input_channels_raise_value_error():
    model = HMaiT(in_channels=4, **SMALL)
    assert len(_features(model, torch.randn(1, 4, 32, 32))) == 4
    with pytest.raises(ValueError, match=r'in_channels=4'):
        model(torch.randn(1, 3, 32, 32))


def test_pretrained_local_checkpoint_loads_and_missing_file_is_named(tmp_path):
    torch.manual_seed(0)
    source = HMaiT(**SMALL)
    path = tmp_path / 'hmait.pth'
    # as written by classification training: the timm model under `backbone.` inside `state_dict`
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in source.state_dict().items()}, 'meta': {}}, path)
    target = HMaiT(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **SMALL)
    target.init_weights()
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    missing = HMaiT(init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'nope.pth')), **SMALL)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nope.pth'))):
        missing.init_weights()


def test_checkpoint_without_a_single_matching_key_fails_loudly(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'state_dict': {'encoder.weight': torch.zeros(3)}}, path)
    model = HMaiT(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **SMALL)
    with pytest.raises(RuntimeError, match=f'no parameter of {re.escape(str(path))} matches'):
        model.init_weights()


def test_swin_checkpoint_needs_convert_weights_then_loads(tmp_path):
    swin = timm.create_model('swin_tiny_patch4_window7_224', depths=(1, 1, 1, 1))
    path = tmp_path / 'swin.pth'
    torch.save(swin.state_dict(), path)
    with pytest.raises(ValueError, match='convert_weights=True'):
        HMaiT(init_cfg=dict(type='Pretrained', checkpoint=str(path)), **SMALL).init_weights()
    model = HMaiT(init_cfg=dict(type='Pretrained', checkpoint=str(path)), convert_weights=True, **SMALL)
    model.init_weights()
    assert torch.equal(model.layers[1].downsample.reduction.weight, swin.layers[1].downsample.reduction.weight)
    assert torch.equal(model.norm3.weight, swin.norm.weight)


def _microsoft_layout(timm_sd):
    """timm Swin keys -> the original repository's layout (downsample closes the previous stage)."""
    out = {}
    for k, v in timm_sd.items():
        m = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', k)
        if m:
            k = f'layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}'
        out[k.replace('head.fc.', 'head.')] = v
    return out


def test_microsoft_layout_converts_like_timm_does():
    from timm.models.swin_transformer import checkpoint_filter_fn
    swin = timm.create_model('swin_tiny_patch4_window7_224', depths=(1, 1, 1, 1))
    ms = _microsoft_layout(swin.state_dict())
    ours, dropped = convert_swin_state_dict(ms)
    timm_view = checkpoint_filter_fn(ms, swin)
    expected = {('norm3.' + k[5:] if k.startswith('norm.') else k): v for k, v in timm_view.items()
                if 'relative_position' not in k and 'attn_mask' not in k}
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], expected[k]) for k in ours)
    model = timm.create_model('hmait_tiny', depths=(1, 1, 1, 1))
    result = model.load_state_dict(ours, strict=False)
    assert not result.missing_keys and not result.unexpected_keys


def test_timm_features_only_gives_the_mm_backbone_maps():
    torch.manual_seed(0)
    backbone = HMaiT(**SMALL)
    features = timm.create_model('hmait_tiny', features_only=True, depths=(1, 1, 1, 1), drop_path_rate=0.)
    missing, unexpected = features.model.load_state_dict(backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith('head.') for k in missing)
    x = torch.randn(1, 3, 96, 80)
    features.eval()
    with torch.no_grad():
        ours = features(x)
    ref = _features(backbone, x)
    assert features.feature_info.channels() == [96, 192, 384, 768]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert len(ours) == 4 and all(torch.equal(a, b) for a, b in zip(ours, ref))
    sub = timm.create_model('hmait_tiny', features_only=True, out_indices=(2, 3), depths=(1, 1, 1, 1))
    assert [o.shape[1] for o in sub(x)] == [384, 768]


def test_timm_classifier_interface():
    model = timm.create_model('hmait_tiny', num_classes=10, depths=(1, 1, 1, 1))
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 2, 768)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 768)
    final, inter = model.forward_intermediates(x)
    assert [t.shape[1] for t in inter] == [96, 192, 384, 768] and final.shape == feats.shape
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match='pretrained=True needs a local checkpoint'):
        timm.create_model('hmait_tiny', pretrained=True)


def test_timm_pretrained_from_local_file(tmp_path):
    source = timm.create_model('hmait_tiny', depths=(1, 1, 1, 1), num_classes=7)
    path = tmp_path / 'w.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model('hmait_tiny', pretrained=True, depths=(1, 1, 1, 1), num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path)))
    # timm re-initialises a head whose class count differs from the pretrained config's (1000)
    assert torch.equal(model.layers[2].blocks[0].attn.qkv.weight, source.layers[2].blocks[0].attn.qkv.weight)
    assert torch.equal(model.norm3.weight, source.norm3.weight)


def test_absolute_position_embedding_is_resized():
    model = HMaiT(use_abs_pos_embed=True, pretrain_img_size=64, **SMALL)
    assert model.absolute_pos_embed.shape == (1, 16 * 16, 96)
    outs = _features(model, torch.randn(1, 3, 96, 40))
    assert outs[0].shape == (1, 96, 24, 10)
    with torch.no_grad():
        model.absolute_pos_embed.add_(1.0)
    assert not torch.allclose(_features(model, torch.randn(1, 3, 96, 40).zero_())[0],
                              _features(HMaiT(**SMALL), torch.zeros(1, 3, 96, 40))[0])


@pytest.mark.parametrize('dtype,backend', [(torch.float64, 'sdpa'), (torch.float32, 'matmul')])
def test_global_heads_drop_attention_only_in_training(dtype, backend):
    attn = MaskedMultiheadAttention(8, 2, num_masked_heads=1, attn_drop=0.5).to(dtype)
    x = torch.randn(1, 9, 8, dtype=dtype)
    assert choose_global(torch.empty(1, 1, 9, 4, dtype=dtype, requires_grad=True)).backend == backend
    attn.eval()
    assert torch.equal(attn(x, (3, 3)), attn(x, (3, 3)))
    attn.train()
    torch.manual_seed(0)
    a = attn(x, (3, 3))
    torch.manual_seed(1)
    assert not torch.equal(a, attn(x, (3, 3)))


@pytest.mark.parametrize('dtype,backend', [(torch.float64, 'sdpa'), (torch.float32, 'matmul')])
def test_global_heads_match_manual_attention_with_the_module_scale(dtype, backend):
    """The global heads use the module's scale (qk_scale), not SDPA's default, on either path."""
    attn = MaskedMultiheadAttention(8, 2, num_masked_heads=0, qk_scale=0.1).to(dtype)
    x = torch.randn(1, 6, 8, dtype=dtype)
    q, k, v = attn.qkv(x).reshape(1, 6, 3, 2, 4).permute(2, 0, 3, 1, 4)
    assert choose_global(q).backend == backend
    ref = F.softmax((q.double() @ k.double().transpose(-2, -1)) * 0.1, -1) @ v.double()
    out = attn.proj(ref.transpose(1, 2).reshape(1, 6, 8).to(dtype))
    torch.testing.assert_close(attn(x, (2, 3)), out)
