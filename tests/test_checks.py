"""One argument check per argument: the same mistake reads the same in every layer it enters."""
import pytest
import torch

from hmait.models import HMaiT, MaiT, MaskedMultiheadAttention
from hmait.ops import masked_attention
from hmait.ops.checks import check_int, is_int


def _message(fn) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


SMALL_HMAIT = dict(embed_dims=8, depths=(1,), num_heads=(1,), masked_heads=(1,), strides=(4,), out_indices=(0,))


def test_mask_size_and_mode_errors_are_identical_in_every_layer():
    q = torch.randn(1, 1, 4, 8)
    mask_size = {
        _message(lambda: masked_attention(q, q, q, (2, 2), mask_size=4)),
        _message(lambda: MaskedMultiheadAttention(8, 2, 1, mask_size=4)),
        _message(lambda: HMaiT(**SMALL_HMAIT, mask_size=4)),
        _message(lambda: MaiT(img_size=32, embed_dim=8, depth=1, num_heads=2, mask_size=4)),
    }
    assert mask_size == {'mask_size must be a positive odd integer (3, 5, ...), got 4'}
    mode = {
        _message(lambda: masked_attention(q, q, q, (2, 2), mode='fuzzy')),
        _message(lambda: MaskedMultiheadAttention(8, 2, 1, mode='fuzzy')),
    }
    assert mode == {"mode must be one of ('hard', 'soft', 'strict'), got 'fuzzy'"}
    # The models name their own argument, with the same wording.
    assert _message(lambda: HMaiT(**SMALL_HMAIT, mask_mode='fuzzy')) == 'mask_' + mode.pop()


def test_masked_head_count_is_checked_alike():
    module = _message(lambda: MaskedMultiheadAttention(8, 2, num_masked_heads=3))
    backbone = _message(lambda: HMaiT(**{**SMALL_HMAIT, 'num_heads': (2,), 'masked_heads': (3,)}))
    mait = _message(lambda: MaiT(img_size=32, embed_dim=8, depth=1, num_heads=2, masked_heads=[3]))
    assert module == 'num_masked_heads must be an integer in [0, num_heads=2], got 3'
    assert backbone == 'masked_heads[0] must be an integer in [0, num_heads[0]=2], got 3'
    assert mait == 'masked_heads[0] must be an integer in [0, num_heads=2], got 3'


@pytest.mark.parametrize('value,ok', [(3, True), (True, False), (3.0, False), ('3', False), (None, False)])
def test_booleans_are_not_integers(value, ok):
    assert is_int(value) is ok
    if ok:
        assert check_int('n', value, minimum=1) == value
    else:
        with pytest.raises(ValueError, match=f'n must be a positive integer, got {value!r}'):
            check_int('n', value, minimum=1)
