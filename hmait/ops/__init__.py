"""Functional masked attention: reference and fast paths, no module state."""
from .checks import MASK_MODES
from .global_attention import GLOBAL_BACKENDS, global_attention
from .masked_attention import (
    dense_attention_map,
    dense_masked_attention,
    masked_attention,
    masked_attention_qkv,
    neighbourhood_mask,
)

__all__ = ['GLOBAL_BACKENDS', 'MASK_MODES', 'dense_attention_map', 'dense_masked_attention', 'global_attention',
           'masked_attention', 'masked_attention_qkv', 'neighbourhood_mask']
