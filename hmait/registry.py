"""The one place that registers H-MaiT models: mmengine's root MODELS registry and timm."""
from __future__ import annotations

from mmengine.registry import MODELS
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .models import HMaiT, HMaiTClassifier

# Root registry: mmdet's and mmseg's registries are its children, so `type='HMaiT'` resolves
# from either default scope.
MODELS.register_module(name='HMaiT', module=HMaiT)


def _cfg(**kwargs) -> dict:
    return dict(url='', num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation='bicubic', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv='patch_embed.proj', classifier='head.fc', license='apache-2.0', **kwargs)


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
