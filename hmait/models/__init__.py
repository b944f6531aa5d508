"""nn.Modules: the masked attention module and block, HMaiT, MaiT and the classifiers."""
from .checkpoint import convert_swin_state_dict, load_pretrained, safe_load
from .classifier import HMaiTClassifier
from .hmait import ARCH_SETTINGS, HMaiT
from .layers import MaskedAttentionBlock, MaskedMultiheadAttention
from .mait import SCHEMES, MaiT, masking_scheme

__all__ = ['ARCH_SETTINGS', 'HMaiT', 'HMaiTClassifier', 'MaskedAttentionBlock', 'MaskedMultiheadAttention',
           'convert_swin_state_dict', 'load_pretrained', 'safe_load', 'MaiT', 'SCHEMES', 'masking_scheme']
