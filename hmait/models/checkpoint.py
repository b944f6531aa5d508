"""Safe checkpoint loading and Swin -> H-MaiT key conversion.

H-MaiT keeps Swin's parameters except the window machinery, so Swin checkpoints in the three
layouts in circulation convert by renaming:

* Microsoft (the original repository): ``layers.{i}.downsample`` closes stage i, ``norm`` is final.
* mmdet (``tools/model_converters/swin2mmdet.py`` output, or a detector's ``backbone.``):
  ``stages.{i}``, ``attn.w_msa``, ``ffn.layers``, ``patch_embed.projection``, and patch
  merging weights in ``nn.Unfold`` channel order.
* timm (>= 0.9): already H-MaiT's layout (``layers.{i}.downsample`` opens stage i).
"""
from __future__ import annotations

import io
import logging
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

# Tensors that only exist for window attention; they have no H-MaiT counterpart.
SWIN_ONLY_KEYS = re.compile(r'(relative_position_bias_table|relative_position_index|attn_mask)$')


def _allowed_globals() -> list:
    """Types mmengine writes into its checkpoints (message hub, history buffers), for weights_only loading."""
    import numpy as np
    from mmengine.logging.history_buffer import HistoryBuffer

    allowed = [HistoryBuffer, np.ndarray, np.dtype]
    core = getattr(np, '_core', None) or np.core
    allowed.append(core.multiarray._reconstruct)
    allowed += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'uint8', 'bool')]
    allowed += [np.float64, np.float32, np.int64, np.int32, np.bool_]
    if hasattr(core.multiarray, 'scalar'):
        allowed.append(core.multiarray.scalar)
    return allowed


def allow_mmengine_checkpoint_types() -> None:
    """Allow-list mmengine's own checkpoint types for ``torch.load(weights_only=True)``."""
    torch.serialization.add_safe_globals(_allowed_globals())


def is_safetensors(path: str) -> bool:
    """Whether ``path`` names a safetensors file (by its extension, as timm and the Hugging Face hub do)."""
    return str(path).endswith('.safetensors')


def safe_load(path: str, map_location: str | torch.device = 'cpu') -> dict:
    """A checkpoint's contents, read without running any code from the file.

    ``.safetensors`` files hold tensors only and are read by ``safetensors``; any other file goes
    through ``torch.load`` with ``weights_only=True``: tensors, containers and mmengine's own types.
    Raises FileNotFoundError naming a missing file, and RuntimeError naming the file when it
    cannot be read that way (an arbitrary pickled object could execute code on load).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if is_safetensors(path):
        from safetensors.torch import load_file  # timm's dependency; imported only when used
        try:
            return load_file(path, device=str(torch.device(map_location)))
        except Exception as err:  # safetensors raises its own SafetensorError for damaged files
            raise RuntimeError(f'cannot read checkpoint {path} as safetensors: {err}') from err
    allow_mmengine_checkpoint_types()
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError depending on version
        raise RuntimeError(f'refusing to load checkpoint {path}: it is not a plain weights file '
                           f'(weights_only loading failed: {err})') from err


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` never holds a partial file.

    The bytes go to a hidden temporary file next to ``path`` (same file system, so the rename is
    atomic), are flushed to disk, and only then replace ``path``. On any error the temporary file
    is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(os.path.expanduser(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp')
    # O_EXCL: never write through a file or link someone else created under the temporary name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; some file systems refuse to open directories, which only
    # weakens durability after a power loss, not atomicity.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_weights(state_dict: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write ``state_dict`` to ``path``: safetensors for a ``.safetensors`` name, else ``torch.save``.

    A ``torch.save`` file holds ``{'state_dict': ..., 'meta': metadata}`` (mmengine's layout); a
    safetensors file holds the tensors, with ``metadata`` as its string-to-string header. Written
    with :func:`atomic_write_bytes`: the file appears complete or not at all.
    """
    if is_safetensors(path):
        from safetensors.torch import save
        # safetensors stores each tensor's own bytes: no views of shared or strided storage.
        data = save({k: v.detach().contiguous() for k, v in state_dict.items()},
                    metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    else:
        buffer = io.BytesIO()
        torch.save({'state_dict': state_dict, 'meta': dict(metadata or {})}, buffer)
        data = buffer.getvalue()
    atomic_write_bytes(path, data)


def require_local_weights(variant: str, pretrained: bool, kwargs: dict) -> None:
    """No weights are published, so ``pretrained=True`` in timm needs a local file to load."""
    if pretrained and not (kwargs.get('pretrained_cfg_overlay') or {}).get('file'):
        raise ValueError(f'{variant}: pretrained=True needs a local checkpoint, '
                         "pretrained_cfg_overlay=dict(file='/path/to/checkpoint.pth'); no weights are downloaded")


def extract_state_dict(checkpoint: dict, prefix: str | None = None) -> dict:
    """The state dict inside a checkpoint, with a wrapping prefix (``backbone.``, ``module.``) removed."""
    sd = checkpoint
    for key in ('state_dict', 'model', 'module'):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f'checkpoint holds no state dict (got {type(sd).__name__})')
    prefixes = [prefix] if prefix else ['module.', 'backbone.']
    for pre in prefixes:
        if any(k.startswith(pre) for k in sd):
            sd = OrderedDict((k[len(pre):], v) for k, v in sd.items() if k.startswith(pre))
    return sd


def swin_layout(state_dict: dict) -> str | None:
    """'microsoft', 'mmdet' or 'timm' for a Swin state dict, None when it is not Swin."""
    keys = list(state_dict)
    if not any(SWIN_ONLY_KEYS.search(k) for k in keys):
        return None
    if any(k.startswith('stages.') for k in keys):
        return 'mmdet'
    if any(k.startswith('layers.0.downsample.') for k in keys):
        return 'microsoft'
    return 'timm'


def _unfold_to_concat_order(t: torch.Tensor) -> torch.Tensor:
    """Patch-merging channels from nn.Unfold order (c*4 + kh*2 + kw) to Swin's concat order
    (x(0,0), x(1,0), x(0,1), x(1,1), each C channels)."""
    lead = t.shape[:-1]
    c = t.shape[-1] // 4
    return t.reshape(*lead, c, 4)[..., [0, 2, 1, 3]].transpose(-1, -2).reshape(*lead, 4 * c)


def convert_swin_state_dict(state_dict: dict, num_stages: int = 4) -> tuple[OrderedDict, list[str]]:
    """Rename a Swin state dict to H-MaiT keys. Returns (converted, dropped_keys)."""
    layout = swin_layout(state_dict)
    if layout is None:
        raise ValueError('not a Swin state dict: no relative_position_bias_table / attn_mask keys found')
    out, dropped = OrderedDict(), []
    last = num_stages - 1
    for key, value in state_dict.items():
        if SWIN_ONLY_KEYS.search(key):
            dropped.append(key)
            continue
        new = key
        if layout == 'mmdet':
            new = new.replace('patch_embed.projection.', 'patch_embed.proj.')
            new = re.sub(r'^stages\.', 'layers.', new)
            new = new.replace('.attn.w_msa.', '.attn.')
            new = new.replace('.ffn.layers.0.0.', '.mlp.fc1.').replace('.ffn.layers.1.', '.mlp.fc2.')
            if '.downsample.' in new:
                value = _unfold_to_concat_order(value) if 'reduction' in new or 'norm' in new else value
        if layout in ('mmdet', 'microsoft'):
            match = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', new)
            if match:  # closes stage i there, opens stage i + 1 here
                new = f'layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}'
        if new.startswith('norm.'):
            new = f'norm{last}.' + new[len('norm.'):]
        if layout != 'timm' and new.startswith('head.') and not new.startswith('head.fc.'):
            new = 'head.fc.' + new[len('head.'):]
        out[new] = value
    return out, dropped


@dataclass
class StateDictFit:
    """How a state dict fits a model's: keys that load, and every reason the others do not."""

    matched: list[str]
    missing: list[str]                                   # the model's keys the file lacks
    unexpected: list[str]                                # the file's keys the model lacks
    mismatched: list[tuple[str, tuple, tuple]]           # (key, file shape, model shape)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 3) -> str:
        """The reasons, shape mismatches first, each with its count and its first ``limit`` keys."""
        def listed(items: list[str]) -> str:
            more = f', ... ({len(items)} in all)' if len(items) > limit else ''
            return ', '.join(items[:limit]) + more

        parts = []
        if self.mismatched:
            parts.append(f'{len(self.mismatched)} of another shape: ' + listed(
                [f'{k} (file {tuple(f)}, model {tuple(m)})' for k, f, m in self.mismatched]))
        if self.missing:
            parts.append(f'{len(self.missing)} missing from the file: {listed(self.missing)}')
        if self.unexpected:
            parts.append(f'{len(self.unexpected)} unknown to the model: {listed(self.unexpected)}')
        return '; '.join(parts) if parts else 'every tensor fits'


def state_dict_fit(own: dict, state_dict: dict) -> StateDictFit:
    """Compare a file's ``state_dict`` with a model's ``own`` state dict, key by key and shape by shape."""
    matched, mismatched = [], []
    for key, value in state_dict.items():
        if key in own:
            if tuple(own[key].shape) == tuple(value.shape):
                matched.append(key)
            else:
                mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
    return StateDictFit(matched, [k for k in own if k not in state_dict],
                        [k for k in state_dict if k not in own], mismatched)


def load_pretrained(model: nn.Module, path: str, convert_swin: bool = False, prefix: str | None = None,
                    logger: logging.Logger | None = None) -> dict:
    """Load an H-MaiT (or, with ``convert_swin``, a Swin) checkpoint into ``model``, non-strictly.

    Keys missing from the file keep their initialisation; keys whose shape differs are skipped.
    Raises when not a single key matches, since a silently untouched model is the worst outcome.
    Returns a report dict with lists under 'matched', 'missing', 'unexpected', 'dropped', 'shape_mismatch'.
    """
    state_dict = extract_state_dict(safe_load(path), prefix)
    dropped: list[str] = []
    layout = swin_layout(state_dict)
    if layout is not None:
        if not convert_swin:
            raise ValueError(f'{path} is a Swin checkpoint ({layout} layout); set convert_weights=True '
                             f'to convert it on load, or convert it with tools/model_converters/swin2hmait.py')
        state_dict, dropped = convert_swin_state_dict(state_dict, num_stages=len(getattr(model, 'layers', [])) or 4)
    own = model.state_dict()
    fit = state_dict_fit(own, state_dict)
    if not fit.matched:
        raise RuntimeError(f'no parameter of {path} matches the model: {fit.describe()}')
    model.load_state_dict({k: state_dict[k] for k in fit.matched}, strict=False)
    report = dict(matched=fit.matched, missing=fit.missing, unexpected=fit.unexpected, dropped=dropped,
                  shape_mismatch=[k for k, _, _ in fit.mismatched])
    if logger is not None:
        logger.info(f'loaded {len(fit.matched)}/{len(own)} tensors from {path}')
        for name in ('missing', 'unexpected', 'shape_mismatch'):
            if report[name]:
                logger.warning(f'{name} keys ({len(report[name])}): {report[name]}')
    return report
