"""H-MaiT: hierarchical vision transformer with masked attention heads (MaiT, Li et al. 2022).

Importing the package registers ``HMaiT`` in mmengine's root MODELS registry and the
``hmait_*`` models in timm, and changes nothing else in the process. It never imports mmcv, mmdet,
mmseg, opencv or the training package ``hmait.engine`` (which configs load through ``custom_imports``).
"""
from . import registry  # noqa: F401  (registration side effects)
from .models import HMaiT, HMaiTClassifier, MaskedAttentionBlock, MaskedMultiheadAttention
from .ops import dense_masked_attention, masked_attention, neighbourhood_mask

__version__ = '0.1.0'
__all__ = ['HMaiT', 'HMaiTClassifier', 'MaskedAttentionBlock', 'MaskedMultiheadAttention',
           'dense_masked_attention', 'masked_attention', 'neighbourhood_mask']
