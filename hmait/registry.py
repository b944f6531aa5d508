"""Registers the H-MaiT backbone in mmengine's root MODELS registry.

The timm entry points (``hmait_*``, ``mait_*``) are registered next to the models they build, in
:mod:`hmait.models.classifier` and :mod:`hmait.models.mait`, when :mod:`hmait.models` is imported.
"""
from __future__ import annotations

from mmengine.registry import MODELS

from .models import HMaiT

# Root registry: mmdet's and mmseg's registries are its children, so `type='HMaiT'` resolves
# from either default scope.
MODELS.register_module(name='HMaiT', module=HMaiT)

