"""What timm expects of its models: TorchScript, torch.fx, factory device/dtype, pruning, Swin weights."""
import copy

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import hmait  # noqa: F401  (registers the models)

SMALL_HMAIT = dict(embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), masked_heads=(1, 1, 1, 0),
                   drop_path_rate=0.)
SMALL_MAIT = dict(depth=12, img_size=64, drop_path_rate=0.)
# Each mask mode once; MaiT's Sch.1 masks one head per layer, so 'strict' has somewhere to act.
CASES = [('hmait_tiny', dict(SMALL_HMAIT, mask_mode='hard')), ('hmait_tiny', dict(SMALL_HMAIT, mask_mode='soft')),
         ('mait_tiny', dict(SMALL_MAIT, masked_heads=1, mask_mode='strict')),
         # Global heads with a span: pre-trained at 32 px, every test size is beyond their span grid.
         ('hmait_tiny', dict(SMALL_HMAIT, global_attn='pooled', pretrain_img_size=32)),
         ('hmait_tiny', dict(SMALL_HMAIT, global_attn='windowed', pretrain_img_size=32))]
CASE_IDS = ['hmait-hard', 'hmait-soft', 'mait-strict', 'hmait-pooled', 'hmait-windowed']


def _model(name: str, kwargs: dict, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kwargs, **extra).eval()


def _fx(model: torch.nn.Module) -> torch.nn.Module:
    """The model symbolically traced with timm's leaf modules and functions, returning its output node."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize('name,kwargs', CASES, ids=CASE_IDS)
def test_torchscript_matches_eager(name, kwargs):
    model = _model(name, kwargs)
    with torch.no_grad():
        scripted = torch.jit.script(model)
        for size in ((64, 64), (80, 48)):
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(scripted(x), model(x))
        # The scripted model still checks its input.
        with pytest.raises(Exception, match='must have shape'):
            scripted(torch.randn(1, 4, 64, 64))


@pytest.mark.parametrize('name,kwargs', CASES, ids=CASE_IDS)
def test_fx_trace_matches_eager_at_other_sizes_and_scripts(name, kwargs):
    model = _model(name, kwargs)
    traced = _fx(model)
    with torch.no_grad():
        # Grid sizes stay traced values: a size other than the one traced runs too.
        for size in ((64, 64), (96, 80)):
            x = torch.randn(1, 3, *size)
            (out,) = traced(x).values()
            torch.testing.assert_close(out, model(x))
        (scripted,) = torch.jit.script(traced)(x).values()
        torch.testing.assert_close(scripted, model(x))


def test_fx_backward_reaches_every_parameter():
    model = _model('hmait_tiny', dict(SMALL_HMAIT, mask_mode='soft')).train()
    traced = _fx(model).train()
    (out,) = traced(torch.randn(2, 3, 64, 64)).values()
    out.square().mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing
    assert traced.get_parameter('layers.0.blocks.0.attn.soft_mask_logit').grad.abs().sum() > 0


@pytest.mark.parametrize('name,kwargs', CASES[::2], ids=CASE_IDS[::2])
def test_factory_device_and_dtype_reach_every_tensor(name, kwargs):
    model = timm.create_model(name, device='meta', dtype=torch.float64, **kwargs)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == 'meta' and t.dtype == torch.float64 for t in tensors)
    # A head reset on a model whose head had no parameters is still made where the model lives.
    model.reset_classifier(0)
    model.reset_classifier(3)
    assert all(p.device.type == 'meta' and p.dtype == torch.float64 for p in model.get_classifier().parameters())
    with pytest.raises(TypeError):
        timm.create_model(name, not_an_argument=1, **kwargs)


def test_forward_features_declare_their_layout():
    model = _model('hmait_tiny', SMALL_HMAIT)
    assert model.output_fmt == 'NHWC'
    feats = model.forward_features(torch.randn(1, 3, 64, 96))
    assert feats.shape == (1, 2, 3, model.num_features)


def test_state_dict_keeps_mmdet_names_and_round_trips():
    model = _model('hmait_tiny', SMALL_HMAIT)
    state = model.state_dict()
    assert not [k for k in state if 'stage_norms' in k]
    assert 'norm3.weight' in state
    other = _model('hmait_tiny', SMALL_HMAIT, drop_rate=0.)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.)
    result = other.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
    # The output norm used in the forward is the loaded one, not a stale copy.
    assert other.stage_norms[3] is other.norm3


def test_forward_intermediates_norm_applies_the_output_norms():
    model = _model('hmait_tiny', SMALL_HMAIT)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, raw = model.forward_intermediates(x)
        _, normed = model.forward_intermediates(x, norm=True)
        torch.testing.assert_close(final, model.forward_features(x))
        for a, b in zip(raw[:3], normed[:3]):  # no output norm on stages 0-2 of a classifier
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(normed[3], final.permute(0, 3, 1, 2))
        assert not torch.allclose(raw[3], normed[3])


@pytest.mark.parametrize('prune_norm', [False, True])
def test_prune_intermediate_layers_removes_later_stages(prune_norm):
    model = _model('hmait_tiny', SMALL_HMAIT)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
    pruned = copy.deepcopy(model)
    kept = pruned.prune_intermediate_layers([0, 1], prune_norm=prune_norm)
    assert kept == [0, 1]
    assert len(pruned.layers) == 2 and not hasattr(pruned, 'norm3')
    assert not [k for k in pruned.state_dict() if k.startswith(('layers.2', 'layers.3', 'norm3', 'head.fc'))]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters()) / 4
    assert pruned.num_features == pruned.head_hidden_size == 32 and pruned.num_classes == 0
    with torch.no_grad():
        for a, b in zip(pruned.forward_intermediates(x, indices=kept, intermediates_only=True), taps[:2]):
            torch.testing.assert_close(a, b)
        # Features end at the last kept stage; the head no longer pools.
        torch.testing.assert_close(pruned.forward_features(x).permute(0, 3, 1, 2), taps[1])
        assert pruned(x).shape == (2, 8, 8, 32)
    pruned.train()
    sum(t.sum() for t in pruned.forward_intermediates(x, indices=kept, intermediates_only=True)).backward()
    assert not [n for n, p in pruned.named_parameters() if p.grad is None]


def test_features_only_prunes_to_the_requested_stages():
    features = timm.create_model('hmait_tiny', features_only=True, out_indices=(0, 1), **SMALL_HMAIT)
    assert len(features.model.layers) == 2
    assert hasattr(features.model, 'norm0') and hasattr(features.model, 'norm1')
    assert [o.shape[1] for o in features(torch.randn(1, 3, 64, 64))] == [16, 32]


def test_swin_checkpoint_loads_through_timm_pretrained(tmp_path):
    """timm's own Swin-T weights (window tensors dropped) load into H-MaiT-T with pretrained=True."""
    torch.manual_seed(0)
    depths = dict(depths=(1, 1, 2, 1))
    swin = timm.create_model('swin_tiny_patch4_window7_224', **depths)
    path = tmp_path / 'swin_tiny_patch4_window7_224.pth'
    torch.save(swin.state_dict(), path)
    overlay = dict(pretrained_cfg_overlay=dict(file=str(path)))

    model = timm.create_model('hmait_tiny', pretrained=True, **depths, **overlay)
    ours = model.state_dict()
    swin_state = swin.state_dict()
    assert torch.equal(ours['norm3.weight'], swin_state['norm.weight'])
    shared = [k for k in ours if k in swin_state]
    assert len(shared) == len(ours) - 2  # everything but norm3.weight / bias, which come from Swin's norm
    assert all(torch.equal(ours[k], swin_state[k]) for k in shared)
    with torch.no_grad():
        feats = model.eval().forward_features(torch.randn(1, 3, 64, 64))
        torch.testing.assert_close(model.forward_head(feats), swin.eval().forward_head(feats))

    # Soft masking factors and the extra output norms of features_only models have no Swin counterpart:
    # they keep their initialisation, and everything else loads.
    soft = timm.create_model('hmait_tiny', pretrained=True, mask_mode='soft', **depths, **overlay)
    assert torch.equal(soft.layers[2].blocks[1].attn.qkv.weight, swin.layers[2].blocks[1].attn.qkv.weight)
    assert torch.allclose(soft.layers[0].blocks[0].attn.alpha, torch.tensor(0.5))
    features = timm.create_model('hmait_tiny', pretrained=True, features_only=True, **depths, **overlay)
    assert torch.equal(features.model.layers[1].downsample.reduction.weight,
                       swin.layers[1].downsample.reduction.weight)
    assert torch.equal(features.model.norm3.weight, swin.norm.weight)

    # A different head size drops the classifier, as timm does for its own models.
    ten = timm.create_model('hmait_tiny', pretrained=True, num_classes=10, **depths, **overlay)
    assert ten.head.fc.weight.shape == (10, 768)
    assert torch.equal(ten.patch_embed.proj.weight, swin.patch_embed.proj.weight)


def test_optimiser_constructor_meets_every_parameter_once():
    """The output norms are reachable by stage index too; mmengine's per-module walk must not add them twice."""
    from mmengine.optim import build_optim_wrapper

    model = timm.create_model('hmait_tiny', features_only=True, **SMALL_HMAIT).model
    wrapper = build_optim_wrapper(model, dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
                                              paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.)})))
    params = [p for group in wrapper.optimizer.param_groups for p in group['params']]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert all(model.stage_norms[i] is getattr(model, f'norm{i}') for i in range(4))
    model.eval()
    assert not any(m.training for m in model.modules())
    # Stages without an output norm hold Identity placeholders in the alias; they follow the mode too.
    assert not any(m.training for m in _model('hmait_tiny', SMALL_HMAIT).modules())


def _saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Bytes of the tensors autograd keeps for the backward pass (each storage once), and the loss.

    That is the memory a training step holds at the end of its forward pass, its peak; with
    non-reentrant checkpointing the tensors saved inside a checkpointed block are not kept.
    """
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().mean()
    return sum(storages.values()), loss


@pytest.mark.parametrize('name,kwargs', [CASES[0], CASES[2]], ids=['hmait', 'mait'])
def test_set_grad_checkpointing_checkpoints_the_blocks(name, kwargs):
    """timm's ``set_grad_checkpointing`` (``train.py --grad-checkpointing``): less memory, equal gradients."""
    model = _model(name, dict(kwargs, drop_path_rate=0.1)).train()  # drop path: checkpointing must replay its RNG
    x = torch.randn(2, 3, 64, 64)
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(1)
        saved, loss = _saved_activation_bytes(model, x)
        loss.backward()
        results.append((saved, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_bytes, plain_loss, plain_grads), (cp_bytes, cp_loss, cp_grads) = results
    assert cp_bytes < 0.5 * plain_bytes
    torch.testing.assert_close(cp_loss, plain_loss, rtol=0, atol=0)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(cp_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)
    blocks = [m for m in model.modules() if hasattr(m, 'with_cp')]
    assert blocks and all(m.with_cp for m in blocks)
    model.set_grad_checkpointing(False)
    assert not any(m.with_cp for m in blocks)


@pytest.mark.parametrize('name,kwargs', [CASES[0], CASES[2]], ids=['hmait', 'mait'])
def test_layer_decay_orders_parameters_from_stem_to_head(name, kwargs):
    """``group_matcher`` gives timm's layer-wise learning-rate decay an order from input to output."""
    from timm.optim import create_optimizer_v2
    model = _model(name, kwargs)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): group['lr_scale'] for group in optimizer.param_groups for p in group['params']}
    named = dict(model.named_parameters())
    assert len(scale) == len(named)  # every parameter in exactly one group
    if name.startswith('hmait'):
        order = ['patch_embed.proj.weight', 'layers.0.blocks.0.attn.qkv.weight', 'layers.1.downsample.reduction.weight',
                 'layers.1.blocks.0.mlp.fc1.weight', 'layers.2.blocks.0.norm1.weight',
                 'layers.2.blocks.1.attn.proj.weight', 'layers.3.blocks.0.mlp.fc2.weight']
        last_block, final_norm = 'layers.3.blocks.0.norm1.weight', 'norm3.weight'
    else:
        order = ['patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'blocks.1.norm1.weight',
                 'blocks.5.mlp.fc1.weight', 'blocks.11.attn.proj.weight']
        last_block, final_norm = 'blocks.11.norm1.weight', 'norm.weight'
    scales = [scale[id(named[key])] for key in order]
    assert all(a < b for a, b in zip(scales, scales[1:])), dict(zip(order, scales))
    assert scale[id(named[final_norm])] == scale[id(named[last_block])] == scales[-1] < 1.0  # as in timm's Swin
    assert scale[id(model.get_classifier().weight)] == 1.0  # the head trains at the full rate
    coarse = model.group_matcher(coarse=True)
    from timm.models import group_parameters
    groups = group_parameters(model, coarse)
    assert sum(len(v) for v in groups.values()) == len(named)
