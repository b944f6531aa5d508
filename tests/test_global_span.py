"""The span of the global heads (``HMaiT(global_attn=...)``): pooled keys and values, or windows of the
pre-training grid. Each against a float64 reference built from torch's own operators, gradients
included; exactly the paper's heads wherever the grid fits the span grid; and the backbone with it
everywhere the backbone goes (torch.compile, ONNX with dynamic sizes, checkpoints, timm)."""
import pytest
import torch
import torch.nn.functional as F
from helpers import CONFIGS, DET_CONFIGS, SEG_CONFIGS, require

from hmait.analysis.complexity import attention_macs, count_complexity, projection_macs
from hmait.builder import build_model, read_config
from hmait.models import HMaiT
from hmait.models.layers import MaskedAttentionBlock, MaskedMultiheadAttention
from hmait.ops import dense_masked_attention
from hmait.ops.global_attention import GLOBAL_SPANS, global_attention_qkv

SPANS = ('pooled', 'windowed')
# A small backbone whose spans start early: pre-trained at 64 px, its stage grids are 16, 8, 4 and 2,
# so a 160x224 input (grids 40x56 ... 5x7) is beyond them in every stage.
# Stages 1-2 are fully masked, as in the paper.
SMALL = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), masked_heads=(2, 2, 2, 0),
             pretrain_img_size=64, drop_path_rate=0.)


def _qkv(hw, heads=3, d=8, b=2, scale=2.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hw[0] * hw[1], 3, heads, d, generator=g, dtype=torch.float64) * scale).to(dtype)


def _reference(qkv: torch.Tensor, hw, span: str, grid, scale: float) -> torch.Tensor:
    """float64 global heads of span ``span``: keys and values pooled by ``F.adaptive_avg_pool2d``, or
    the full logits with every key outside the query's window set to -inf."""
    b, n, _, heads, d = qkv.shape
    h, w = hw
    q, k, v = (qkv[:, :, i].transpose(1, 2).double() for i in range(3))           # (B, heads, N, d)
    logits_bias = 0.
    if span == 'pooled':
        out_hw = (min(h, grid[0]), min(w, grid[1]))

        def pool(t):
            maps = t.reshape(b * heads, h, w, d).permute(0, 3, 1, 2)
            return F.adaptive_avg_pool2d(maps, out_hw).permute(0, 2, 3, 1).reshape(b, heads, -1, d)
        k, v = pool(k), pool(v)
    elif span == 'windowed':
        rows = torch.arange(h).repeat_interleave(w) // grid[0]
        cols = torch.arange(w).repeat(h) // grid[1]
        same = (rows[:, None] == rows[None]) & (cols[:, None] == cols[None])
        logits_bias = torch.zeros(n, n, dtype=torch.float64).masked_fill(~same, float('-inf'))
    attn = ((q @ k.transpose(-2, -1)) * scale + logits_bias).softmax(dim=-1)
    return (attn @ v).transpose(1, 2)                                                 # (B, N, heads, d)


@pytest.mark.parametrize('span', SPANS)
@pytest.mark.parametrize('hw', [(9, 12), (7, 5), (13, 4), (3, 17), (8, 8), (1, 1)])
def test_span_matches_its_reference_with_gradients(span, hw):
    grid = (4, 4)
    qkv = _qkv(hw).requires_grad_()
    out = global_attention_qkv(qkv, hw, 0.3, span=span, grid=grid)
    ref_input = qkv.detach().clone().requires_grad_()
    ref = _reference(ref_input, hw, span, grid, 0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, qkv, g)
    (ref_grad,) = torch.autograd.grad(ref, ref_input, g)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize('span', SPANS)
@pytest.mark.parametrize('hw,grid', [((4, 4), (4, 4)), ((3, 4), (4, 4)), ((5, 2), (7, 3))])
def test_inside_the_span_grid_the_span_is_the_paper_s_heads(span, hw, grid):
    qkv = _qkv(hw, dtype=torch.float32).requires_grad_()
    full = global_attention_qkv(qkv, hw, 0.3, span='full')
    out = global_attention_qkv(qkv, hw, 0.3, span=span, grid=grid)
    assert torch.equal(out, full)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.autograd.grad(out, qkv, g)[0], torch.autograd.grad(full, qkv, g)[0])


@pytest.mark.parametrize('span', SPANS)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_spans_are_finite_and_close_to_float64(span, dtype):
    hw, grid = (11, 9), (4, 4)
    qkv = _qkv(hw, scale=1.0)
    ref = _reference(qkv, hw, span, grid, 0.35)
    low = qkv.to(dtype).requires_grad_()
    out = global_attention_qkv(low, hw, 0.35, span=span, grid=grid)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < 0.05
    # Gradients in the input dtype (the matmul path's backward runs there) against float64.
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, low, g.to(dtype))
    exact = qkv.clone().requires_grad_()
    (want,) = torch.autograd.grad(_reference(exact, hw, span, grid, 0.35), exact, g)
    assert torch.isfinite(grad.float()).all()
    assert (grad.double() - want).abs().max() / want.abs().max() < (3e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.parametrize('span', SPANS)
def test_autocast_runs_the_span_in_bfloat16(span):
    hw, grid = (10, 6), (4, 4)
    qkv = _qkv(hw, scale=1.0, dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = global_attention_qkv(qkv, hw, 0.35, span=span, grid=grid)
    assert out.dtype == torch.bfloat16
    assert (out.double() - _reference(qkv, hw, span, grid, 0.35)).abs().max() < 0.05


def test_unknown_span_and_missing_grid_are_refused():
    with pytest.raises(ValueError, match="span must be one of"):
        global_attention_qkv(_qkv((2, 2)), (2, 2), span='local')
    with pytest.raises(ValueError, match="global_attn must be one of .*'full'"):
        MaskedMultiheadAttention(16, 2, global_attn='window')
    with pytest.raises(ValueError, match="global_attn='pooled' needs global_grid, a pair"):
        MaskedMultiheadAttention(16, 2, global_attn='pooled')
    with pytest.raises(ValueError, match='without prefix tokens, got num_prefix_tokens=1'):
        MaskedMultiheadAttention(16, 2, global_attn='windowed', global_grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r'full_global_blocks must be block indices in \[0, 4\]'):
        HMaiT(**SMALL, global_attn='windowed', full_global_blocks=(5,))


def _same_weights(**kwargs) -> dict[str, HMaiT]:
    torch.manual_seed(0)
    models = {span: HMaiT(**SMALL, global_attn=span, **kwargs).eval() for span in GLOBAL_SPANS}
    state = models['full'].state_dict()
    for model in models.values():
        model.load_state_dict(state)  # strict: the spans add no parameters
    return models


def test_at_the_pretraining_size_every_span_is_the_paper_s_backbone():
    models = _same_weights()
    image = torch.randn(2, 3, 64, 64, requires_grad=True)
    outputs = {span: model(image) for span, model in models.items()}
    grads = {span: torch.autograd.grad(sum(o.square().sum() for o in out), image)[0]
             for span, out in outputs.items()}
    for span in SPANS:
        assert all(torch.equal(a, b) for a, b in zip(outputs[span], outputs['full'])), span
        assert torch.equal(grads[span], grads['full']), span


def test_beyond_the_pretraining_size_the_spans_differ_from_full_and_stay_finite():
    models = _same_weights()
    image = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        outputs = {span: model(image) for span, model in models.items()}
    for span in SPANS:
        # Stages 1-2 (masked heads only) agree; stages 3-4 do not.
        assert torch.equal(outputs[span][0], outputs['full'][0])
        assert not torch.allclose(outputs[span][3], outputs['full'][3])
        assert all(torch.isfinite(o).all() for o in outputs[span])
    assert [o.shape for o in outputs['pooled']] == [o.shape for o in outputs['full']]


@pytest.mark.parametrize('span', SPANS)
@pytest.mark.parametrize('mode', ['hard', 'soft'])
def test_backbone_spans_match_the_reference_layer_by_layer(span, mode):
    """Each attention layer of the backbone against float64 references at the grid it sees: the
    paper's dense Eq. 2 for the masked heads, the span's reference for the global heads."""
    torch.manual_seed(0)
    model = HMaiT(**SMALL, global_attn=span, mask_mode=mode).double().eval()
    seen = []
    for module in model.modules():
        if isinstance(module, MaskedMultiheadAttention):
            module.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0], args[1], out)))
    with torch.no_grad():
        model(torch.randn(1, 3, 96, 160, dtype=torch.float64))
    for attn, x, hw, out in seen:
        m = attn.num_masked_heads
        qkv = attn._qkv(x)
        # The module's output rebuilt from the reference heads, through its projection.
        heads = []
        if m < attn.num_heads:
            heads.append(_reference(qkv[:, :, :, m:], hw, attn.global_attn, attn.global_grid, attn.scale))
        if m:
            q, k, v = (qkv[:, :, i, :m].transpose(1, 2) for i in range(3))
            masked = dense_masked_attention(q, k, v, hw, attn.mask_size, attn.mode, attn.alpha, 0, attn.scale)
            heads.insert(0, masked.transpose(1, 2))
        expected = attn.proj(torch.cat(heads, dim=2).reshape(x.shape))
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)
    assert sum(attn.num_masked_heads < attn.num_heads for attn, *_ in seen) == 3  # stage 3's two blocks, stage 4


def test_a_hooked_or_replaced_qkv_sees_every_token():
    """Adapters and hooks on qkv are honoured: the pooled layer then projects every token and pools
    the keys and values, which computes the same."""
    torch.manual_seed(0)
    attn = MaskedMultiheadAttention(32, 4, 2, global_attn='pooled', global_grid=(3, 4)).double()
    x, hw = torch.randn(2, 7 * 9, 32, dtype=torch.float64), (7, 9)
    fast = attn(x, hw)
    seen = []
    handle = attn.qkv.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    torch.testing.assert_close(attn(x, hw), fast, rtol=0, atol=1e-12)
    assert seen == [(2, 63, 96)]
    handle.remove()
    attn.qkv = torch.nn.Sequential(attn.qkv)  # e.g. an adapter around the projection
    torch.testing.assert_close(attn(x, hw), fast, rtol=0, atol=1e-12)


def test_pooled_layer_under_autocast_is_close_to_float64():
    """The pooled projection under bf16 autocast (one cast of the input for both projections and the
    pooling) against the same layer in float64, gradients finite."""
    torch.manual_seed(0)
    attn = MaskedMultiheadAttention(64, 4, 1, global_attn='pooled', global_grid=(3, 4))
    x, hw = torch.randn(2, 9 * 11, 64, requires_grad=True), (9, 11)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = attn(x, hw)
    assert out.dtype == torch.bfloat16
    ref = attn.double()(x.double(), hw)
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()
    (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    assert torch.isfinite(grad).all()


def test_dense_attention_maps_are_refused_beyond_the_span_grid():
    torch.manual_seed(0)
    attn = MaskedMultiheadAttention(32, 4, 2, global_attn='pooled', global_grid=(3, 4))
    full = MaskedMultiheadAttention(32, 4, 2)
    full.load_state_dict(attn.state_dict())
    x = torch.randn(1, 12, 32)
    assert torch.equal(attn.attention_maps(x, (3, 4)), full.attention_maps(x, (3, 4)))
    with pytest.raises(ValueError, match=r'the pooled global heads have no dense map on the grid \(4, 5\), larger '
                                         r'than global_grid \(3, 4\)'):
        attn.attention_maps(torch.randn(1, 20, 32), (4, 5))


def test_full_global_blocks_keep_the_paper_s_heads():
    model = HMaiT(**SMALL, global_attn='windowed', full_global_blocks=(3,))
    spans = [block.attn.global_attn for stage in model.layers for block in stage.blocks]
    assert spans == ['windowed', 'windowed', 'windowed', 'full', 'windowed']
    grids = [block.attn.global_grid for stage in model.layers for block in stage.blocks]
    assert grids == [(16, 16), (8, 8), (4, 4), None, (2, 2)]


def test_span_grids_follow_the_pretraining_size_with_odd_grids_padded():
    model = HMaiT(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), masked_heads=(2, 2, 2, 0),
                  pretrain_img_size=(224, 200),
                  global_attn='pooled')
    assert model.global_grids == [(56, 50), (28, 25), (14, 13), (7, 7)]


@pytest.mark.parametrize('span', SPANS)
def test_with_cp_and_frozen_stages_work_with_the_span(span):
    torch.manual_seed(0)
    model = HMaiT(**SMALL, global_attn=span, frozen_stages=1)
    plain = HMaiT(**SMALL, global_attn=span, frozen_stages=1, with_cp=True)
    plain.load_state_dict(model.state_dict())
    model.train(), plain.train()
    image = torch.randn(1, 3, 96, 128)
    grads = []
    for m in (model, plain):
        loss = sum(o.square().mean() for o in m(image))
        grads.append(torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad]))
    assert not model.patch_embed.proj.weight.requires_grad
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('span', SPANS)
def test_span_block_compiles_without_graph_breaks(span):
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = MaskedAttentionBlock(32, num_heads=4, num_masked_heads=2, global_attn=span, global_grid=(3, 4))
    explanation = torch._dynamo.explain(block)(torch.randn(2, 7 * 9, 32), (7, 9))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 7 * 9, 32, requires_grad=True)
    out = compiled(x, (7, 9))
    ref = block(x, (7, 9))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


def test_complexity_counts_the_span():
    # Stage 3 of H-MaiT-T at 800x1344: a 50x84 grid, 12 heads of 32 of which 8 global, span grid 14x14.
    hw, n, d = (50, 84), 50 * 84, 32
    full = attention_macs(n, d, 12, 4, hw=hw)
    pooled = attention_macs(n, d, 12, 4, hw=hw, span='pooled', grid=(14, 14))
    windowed = attention_macs(n, d, 12, 4, hw=hw, span='windowed', grid=(14, 14))
    masked = 4 * 2 * 9 * n * d
    assert full == masked + 8 * 2 * n * n * d
    assert windowed == masked + 8 * 2 * (56 * 84) * 196 * d
    assert pooled == masked + 8 * 2 * n * 196 * d
    assert attention_macs(196, d, 12, 4, hw=(14, 14), span='pooled', grid=(14, 14)) == attention_macs(196, d, 12, 4)
    # The pooled layer projects its 8 global heads' keys and values (512 of the 1152 qkv rows) for the
    # 196 pooled tokens only, and pools the 384 channels of its input.
    c = 384
    assert projection_macs(n, c, 12, 4, hw=hw) == 4 * n * c * c
    assert projection_macs(n, c, 12, 4, hw=hw, span='windowed', grid=(14, 14)) == 4 * n * c * c
    assert projection_macs(n, c, 12, 4, hw=hw, span='pooled', grid=(14, 14)) == (
        4 * n * c * c - (n - 196) * c * 512 + c * (14 * n + 14 * 14 * 84))
    models = _same_weights()
    macs = {span: count_complexity(model, torch.zeros(1, 3, 160, 224)).macs for span, model in models.items()}
    assert macs['pooled'] < macs['full'] and macs['windowed'] < macs['full']


def test_timm_models_take_the_span():
    import timm
    model = timm.create_model('hmait_tiny', pretrained=False, num_classes=3, global_attn='pooled',
                              embed_dims=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), masked_heads=(1, 2, 2, 0))
    assert {b.attn.global_attn for stage in model.layers for b in stage.blocks} == {'pooled'}
    assert model(torch.randn(1, 3, 288, 256)).shape == (1, 3)


class _GridBlock(torch.nn.Module):
    """One block on a ``(B, C, H, W)`` map: its grid is the input's own symbolic size in an export."""

    def __init__(self, span: str):
        super().__init__()
        self.block = MaskedAttentionBlock(16, num_heads=4, num_masked_heads=2, global_attn=span, global_grid=(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.block(x.flatten(2).transpose(1, 2), (h, w)).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize('span', SPANS)
def test_dynamic_onnx_export_of_the_span_runs_at_every_grid(tmp_path, span):
    """One file for every grid: beyond the span grid (pooled keys, padded windows), at it and below it.
    The backbone's export at detection sizes: tests/test_export.py."""
    pytest.importorskip('onnxscript')
    from hmait.deploy import export_onnx, onnxruntime_session

    torch.manual_seed(0)
    model = _GridBlock(span).eval()
    path = tmp_path / 'block.onnx'
    export_onnx(model, str(path), torch.randn(2, 16, 9, 11), dynamic=True)
    session = onnxruntime_session(str(path))
    for shape in [(1, 16, 13, 17), (2, 16, 9, 11), (1, 16, 4, 5), (1, 16, 3, 2), (1, 16, 1, 1)]:
        image = torch.randn(*shape)
        with torch.no_grad():
            expected = model(image)
        (got,) = session.run(None, {'image': image.numpy()})
        assert got.shape == shape
        assert abs(got - expected.numpy()).max() < 1e-4, shape


@pytest.mark.parametrize('name', DET_CONFIGS + SEG_CONFIGS)
def test_shipped_dense_configs_pool_the_global_heads(name):
    require('mmdet' if name in DET_CONFIGS else 'mmseg')
    assert read_config(str(CONFIGS / name)).model.backbone.global_attn == 'pooled'


def test_the_paper_s_global_heads_are_one_config_option_away():
    require('mmdet')
    options = {'model.backbone.global_attn': 'full', 'model.backbone.init_cfg': None}
    backbone = build_model(str(CONFIGS / DET_CONFIGS[0]), part='backbone', cfg_options=options)
    assert {block.attn.global_attn for stage in backbone.layers for block in stage.blocks} == {'full'}
