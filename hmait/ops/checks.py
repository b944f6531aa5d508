"""Argument checks shared by the functional ops, the attention module, HMaiT and MaiT.

Each check raises ``ValueError`` naming the argument, the value given and what is allowed, so the
same mistake reads the same whichever layer it enters through.
"""
# No `from __future__ import annotations`: TorchScript reads the annotations of the ignored
# `check_image` as objects.
from typing import Any

import torch

MASK_MODES = ('hard', 'soft', 'strict')


def is_int(value: Any) -> bool:
    """True for a Python ``int`` that is not a ``bool`` (``True`` is an ``int`` to ``isinstance``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
              maximum_name: str | None = None) -> int:
    """``value`` as an integer in ``[minimum, maximum]`` (either bound optional).

    ``maximum_name`` names where the upper bound comes from, e.g. ``'num_heads'``.
    """
    if is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return value
    if maximum is not None:
        upper = f'{maximum_name}={maximum}' if maximum_name else str(maximum)
        allowed = f'an integer in [{minimum if minimum is not None else "-inf"}, {upper}]'
    elif minimum == 1:
        allowed = 'a positive integer'
    elif minimum == 0:
        allowed = 'a non-negative integer'
    elif minimum is not None:
        allowed = f'an integer >= {minimum}'
    else:
        allowed = 'an integer'
    raise ValueError(f'{name} must be {allowed}, got {value!r}')


def check_positive_int(name: str, value: Any) -> int:
    return check_int(name, value, minimum=1)


def check_mask_size(mask_size: Any, name: str = 'mask_size') -> int:
    """The side of the square mask: a positive odd integer, so that the mask is centred on its token."""
    if not is_int(mask_size) or mask_size <= 0 or mask_size % 2 == 0:
        raise ValueError(f'{name} must be a positive odd integer (3, 5, ...), got {mask_size!r}')
    return mask_size


def check_mode(mode: Any, name: str = 'mode') -> str:
    if mode not in MASK_MODES:
        raise ValueError(f'{name} must be one of {MASK_MODES}, got {mode!r}')
    return mode


def check_masked_heads(count: Any, num_heads: int, name: str = 'num_masked_heads',
                       heads_name: str = 'num_heads') -> int:
    """How many of ``num_heads`` heads are masked: an integer in ``[0, num_heads]``."""
    return check_int(name, count, minimum=0, maximum=num_heads, maximum_name=heads_name)


def check_grid(hw: Any) -> tuple[int, int]:
    """The token grid ``(h, w)`` as two positive Python ints (or symbolic ints while exporting)."""
    try:
        # Symbolic sizes (torch.export with dynamic shapes) stay symbolic: int() would fix them to
        # the example input's grid, and the exported graph would run at that size only.
        h, w = (s if isinstance(s, torch.SymInt) else int(s) for s in hw)
    except (TypeError, ValueError):
        raise ValueError(f'hw must be a pair (height, width) of the token grid, got {hw!r}') from None
    if h <= 0 or w <= 0:
        raise ValueError(f'hw must hold positive grid sizes, got {hw!r}')
    return h, w


def check_packed_qkv(qkv: Any) -> torch.Tensor:
    """A packed qkv projection ``(B, N, 3, heads, d)``."""
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        shape = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f'qkv must have shape (B, N, 3, heads, d), got shape {shape}')
    return qkv


@torch.jit.ignore  # TorchScript calls the check in Python: its message formats the shape as a tuple
def check_image(x: torch.Tensor, channels: int, name: str = 'in_channels') -> None:
    """An image batch ``(B, channels, H, W)``; ``name`` is the model's name for the channel argument."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f'input must have shape (B, {name}={channels}, H, W), got {tuple(x.shape)}')


@torch.jit.unused  # TorchScript cannot compile these checks; scripted code never exports
def exporting() -> bool:
    """True while ``torch.onnx.export`` or ``torch.export`` traces the model."""
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
