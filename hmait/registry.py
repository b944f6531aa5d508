"""The one place that registers H-MaiT models: mmengine's root MODELS registry and timm."""
from __future__ import annotations

from mmengine.registry import MODELS
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .models import HMaiT, HMaiTClassifier, MaiT

# Root registry: mmdet's and mmseg's registries are its children, so `type='HMaiT'` resolves
# from either default scope.
MODELS.register_module(name='HMaiT', module=HMaiT)


def _cfg(**kwargs) -> dict:
    defaults = dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                    interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    first_conv='patch_embed.proj', classifier='head.fc', license='apache-2.0')
    return {**defaults, **kwargs}


# No published weights: pretrained=True needs pretrained_cfg_overlay=dict(file=LOCAL_PATH).
default_cfgs = generate_default_cfgs({name: _cfg() for name in ('hmait_tiny', 'hmait_small', 'hmait_base')})


def _create_hmait(variant: str, arch: str, pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    if pretrained and not (kwargs.get('pretrained_cfg_overlay') or {}).get('file'):
        raise ValueError(f'{variant}: pretrained=True needs a local checkpoint, '
                         "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'); no weights are downloaded")
    if kwargs.get('features_only'):
        # Every requested stage gets its own output norm, exactly as in the mm backbone.
        out_indices = tuple(kwargs.get('out_indices', (0, 1, 2, 3)))
        kwargs.update(out_indices=out_indices, norm_indices=out_indices, feature_cls='getter')
    return build_model_with_cfg(HMaiTClassifier, variant, pretrained, arch=arch, **kwargs)


@register_model
def hmait_tiny(pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    """H-MaiT-T: Swin-T shape, masked heads (3, 6, 4, 0) (paper section 5.4)."""
    return _create_hmait('hmait_tiny', 'tiny', pretrained, **{'drop_path_rate': 0.2, **kwargs})


@register_model
def hmait_small(pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    """H-MaiT-S: Swin-S shape, masked heads (3, 6, 4, 0) (paper section 5.4)."""
    return _create_hmait('hmait_small', 'small', pretrained, **{'drop_path_rate': 0.3, **kwargs})


@register_model
def hmait_base(pretrained: bool = False, **kwargs) -> HMaiTClassifier:
    """H-MaiT-B: Swin-B shape, masked heads (4, 8, 5, 0): proportional masking, not from the paper."""
    return _create_hmait('hmait_base', 'base', pretrained, **{'drop_path_rate': 0.5, **kwargs})


# MaiT (monolithic, DeiT-style). No published weights either.
default_cfgs.update(generate_default_cfgs({
    name: {**_cfg(), 'pool_size': None, 'crop_pct': 0.875, 'classifier': 'head'}
    for name in ('mait_xtiny', 'mait_tiny', 'mait_xsmall', 'mait_small')}))

# Paper Table 2 (D, H) and Table 8 (stochastic depth of the 24-layer models; MaiT-S's is constant).
_MAIT_SIZES = {
    'mait_xtiny': dict(embed_dim=144, num_heads=3, drop_path_rate=0.0),
    'mait_tiny': dict(embed_dim=192, num_heads=3, drop_path_rate=0.0),
    'mait_xsmall': dict(embed_dim=288, num_heads=3, drop_path_rate=0.1),
    'mait_small': dict(embed_dim=384, num_heads=6, drop_path_rate=0.1, drop_path_uniform=True),
}


def _cait_layer_scale_init(depth: int) -> float:
    # CaiT's rule for the LayerScale initial value, which shrinks with depth to keep deep stacks stable.
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


def _create_mait(variant: str, pretrained: bool = False, depth: int = 24, layer_scale: bool | None = None,
                 **kwargs) -> MaiT:
    """Paper Table 7 defaults: 24 layers, LayerScale and Sch.2; 12 layers: Sch.1 without LayerScale."""
    if depth not in (12, 24):
        raise ValueError(f'{variant}: depth must be 12 or 24 (the paper\'s MaiT depths), got {depth!r}; '
                         f'build hmait.models.MaiT directly for other depths')
    if pretrained and not (kwargs.get('pretrained_cfg_overlay') or {}).get('file'):
        raise ValueError(f'{variant}: pretrained=True needs a local checkpoint, '
                         "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'); "
                         'no weights are downloaded')
    if layer_scale is None:
        layer_scale = depth == 24
    kwargs.setdefault('masked_heads', 'sch2' if depth == 24 else 'sch1')
    if layer_scale:
        kwargs.setdefault('layer_scale_init', _cait_layer_scale_init(depth))
    if kwargs.get('features_only'):
        kwargs.setdefault('feature_cls', 'getter')
    args = {**_MAIT_SIZES[variant], 'depth': depth, **kwargs}
    return build_model_with_cfg(MaiT, variant, pretrained, **args)


@register_model
def mait_xtiny(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-XT: D=144, H=3 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_xtiny', pretrained, **kwargs)


@register_model
def mait_tiny(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-T: D=192, H=3 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_tiny', pretrained, **kwargs)


@register_model
def mait_xsmall(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-XS: D=288, H=3 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_xsmall', pretrained, **kwargs)


@register_model
def mait_small(pretrained: bool = False, **kwargs) -> MaiT:
    """MaiT-S: D=384, H=6 (paper Table 2); 24 layers, LayerScale and Sch.2 by default."""
    return _create_mait('mait_small', pretrained, **kwargs)
