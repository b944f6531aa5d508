"""Swin checkpoints from mmdet's own SwinTransformer convert onto H-MaiT, and the converter CLI."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import hmait  # noqa: F401
from hmait.models import HMaiT, convert_swin_state_dict
from hmait.models.checkpoint import safe_load

REPO = Path(__file__).resolve().parents[1]


def test_mmdet_swin_state_dict_converts_with_every_non_window_key_matched():
    from mmdet.models.backbones import SwinTransformer
    swin = SwinTransformer(depths=(1, 1, 1, 1), window_size=7)
    sd = {f'backbone.{k}': v for k, v in swin.state_dict().items()}  # as found in a detector checkpoint
    from hmait.models.checkpoint import extract_state_dict
    converted, dropped = convert_swin_state_dict(extract_state_dict({'state_dict': sd}))
    ours = HMaiT(depths=(1, 1, 1, 1)).state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)
    assert dropped and all('relative_position' in k or 'attn_mask' in k for k in dropped)


def test_mmdet_patch_merging_weights_are_reordered_exactly():
    """mmdet's patch merging (nn.Unfold channel order) and timm's (concatenation order) compute the
    same function once the converter reorders the reduction and norm weights."""
    from mmdet.models.backbones import SwinTransformer
    torch.manual_seed(0)
    swin = SwinTransformer(depths=(1, 1, 1, 1), window_size=7)
    for p in swin.stages[0].downsample.norm.parameters():
        p.data.normal_()
    converted, _ = convert_swin_state_dict(swin.state_dict())
    ours = HMaiT(depths=(1, 1, 1, 1))
    ours.load_state_dict(converted)
    x = torch.randn(2, 6, 10, 96)  # (B, H, W, C)
    expected, _ = swin.stages[0].downsample(x.reshape(2, 60, 96), (6, 10))
    assert torch.allclose(ours.layers[1].downsample(x).reshape(2, -1, 192), expected, atol=1e-5)


def test_converter_cli_reports_and_writes_a_loadable_checkpoint(tmp_path):
    swin = timm.create_model('swin_tiny_patch4_window7_224')
    src = tmp_path / 'swin_tiny.pth'
    torch.save({'model': swin.state_dict()}, src)
    dst = tmp_path / 'out' / 'hmait_tiny_from_swin.pth'
    result = subprocess.run([sys.executable, 'tools/model_converters/swin2hmait.py', str(src), str(dst)],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert 'timm layout' in result.stdout
    assert 'dropped (12)' in result.stdout  # one relative position table per block
    assert 'unmatched (0)' in result.stdout and 'missing (0)' in result.stdout
    model = timm.create_model('hmait_tiny')
    model.load_state_dict(safe_load(str(dst))['state_dict'], strict=True)
    assert torch.equal(model.layers[2].blocks[5].mlp.fc2.weight, swin.layers[2].blocks[5].mlp.fc2.weight)


def test_converter_refuses_a_preset_the_file_does_not_fit(tmp_path, capsys):
    """Swin-T converted with --arch small leaves 12 stage-3 blocks uninitialised: refused, naming the fit."""
    sys.path.insert(0, str(REPO / 'tools' / 'model_converters'))
    try:
        from swin2hmait import main
    finally:
        sys.path.pop(0)
    src = tmp_path / 'swin_tiny.pth'
    torch.save({'model': timm.create_model('swin_tiny_patch4_window7_224').state_dict()}, src)
    dst = tmp_path / 'small.pth'
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), '--out', str(dst), '--arch', 'small'])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f'{src} does not convert into H-MaiT-small; it is an H-MaiT-tiny (--arch tiny)' in err
    assert 'missing from the file: layers.2.blocks.6.' in err and '--allow-partial' in err
    assert not dst.exists()
    assert main([str(src), '--out', str(dst), '--arch', 'small', '--allow-partial']) == 0
    assert 'missing (144)' in capsys.readouterr().out and dst.is_file()


def test_converter_cli_rejects_a_non_swin_file(tmp_path):
    src = tmp_path / 'hmait.pth'
    torch.save({'state_dict': HMaiT(depths=(1, 1, 1, 1)).state_dict()}, src)
    result = subprocess.run([sys.executable, 'tools/model_converters/swin2hmait.py', str(src), str(tmp_path / 'x')],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and 'is not a Swin checkpoint' in result.stderr


@pytest.mark.parametrize('scope', ['mmdet', 'mmseg'])
def test_backbone_builds_through_downstream_registries(scope):
    from mmengine.registry import init_default_scope
    if scope == 'mmdet':
        from mmdet.registry import MODELS
    else:
        from mmseg.registry import MODELS
    init_default_scope(scope)
    model = MODELS.build(dict(type='HMaiT', depths=(1, 1, 1, 1), out_indices=(1, 2, 3), frozen_stages=1))
    assert isinstance(model, HMaiT)
    outs = model(torch.randn(1, 3, 70, 90))
    assert [tuple(o.shape[1:]) for o in outs] == [(192, 9, 12), (384, 5, 6), (768, 3, 3)]
    assert not any(p.requires_grad for p in model.layers[0].parameters())


def test_converter_writes_safetensors_that_every_loader_reads(tmp_path):
    """``--out x.safetensors`` writes tensors only; init_cfg, timm's pretrained file and the converter read it."""
    from safetensors import safe_open
    torch.manual_seed(0)
    depths = dict(depths=(1, 1, 2, 1))
    swin = timm.create_model('swin_tiny_patch4_window7_224', **depths)
    src = tmp_path / 'swin.safetensors'
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(src))  # the converter reads it too
    dst = tmp_path / 'out' / 'hmait_t.safetensors'
    result = subprocess.run([sys.executable, 'tools/model_converters/swin2hmait.py', str(src), '--arch', 'tiny',
                             '--out', str(dst), '--allow-partial'], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert 'layers.2.blocks.5.mlp.fc2.weight' in result.stdout  # tiny's blocks the shallow file lacks
    assert 'timm layout' in result.stdout and f'wrote {dst}' in result.stdout
    with safe_open(str(dst), 'pt') as f:
        assert f.metadata() == {'converted_from': 'swin.safetensors', 'swin_layout': 'timm'}
        assert torch.equal(f.get_tensor('layers.2.blocks.1.mlp.fc1.weight'), swin.layers[2].blocks[1].mlp.fc1.weight)
    assert [p.name for p in dst.parent.iterdir()] == ['hmait_t.safetensors']  # no temporary file left behind

    backbone = HMaiT(**depths, init_cfg=dict(type='Pretrained', checkpoint=str(dst)))
    backbone.init_weights()
    assert torch.equal(backbone.layers[3].blocks[0].attn.qkv.weight, swin.layers[3].blocks[0].attn.qkv.weight)
    assert torch.equal(backbone.norm3.weight, swin.norm.weight)

    model = timm.create_model('hmait_tiny', pretrained=True, **depths, pretrained_cfg_overlay=dict(file=str(dst)))
    assert torch.equal(model.head.fc.weight, swin.head.fc.weight)
    assert torch.equal(model.layers[1].downsample.reduction.weight, swin.layers[1].downsample.reduction.weight)

    # A Swin safetensors file loads with convert_weights=True too, and without it is refused by name.
    converted = HMaiT(**depths, convert_weights=True, init_cfg=dict(type='Pretrained', checkpoint=str(src)))
    converted.init_weights()
    assert torch.equal(converted.layers[0].blocks[0].attn.proj.weight, swin.layers[0].blocks[0].attn.proj.weight)
    with pytest.raises(ValueError, match='swin.safetensors is a Swin checkpoint'):
        HMaiT(**depths, init_cfg=dict(type='Pretrained', checkpoint=str(src))).init_weights()


def test_a_damaged_safetensors_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / 'damaged.safetensors'
    bad.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": not json}')
    with pytest.raises(RuntimeError, match='cannot read checkpoint .*damaged.safetensors as safetensors'):
        safe_load(str(bad))
    result = subprocess.run([sys.executable, 'tools/model_converters/swin2hmait.py', str(bad), str(tmp_path / 'x')],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0 and 'damaged.safetensors' in result.stderr
    assert not (tmp_path / 'x').exists()
