"""Crash-safe checkpoint writing and weights-only checkpoint reading for mmengine's Runner.

mmengine writes checkpoints with a plain ``open(path, 'wb')``: a crash (or a full disk) in the
middle leaves a truncated file under the final name, and ``last_checkpoint`` may point at it.
:class:`AtomicLocalBackend` writes to a temporary file in the same directory, fsyncs it and
renames it over the target, so the target is always either the old or the new complete file.

mmengine also reads checkpoints with a bare ``torch.load``; :func:`install_weights_only_loading`
replaces its local-file loader by :func:`load_local_weights_only`, so every checkpoint (resume,
``load_from``, ``init_cfg``) is read with ``weights_only=True`` and mmengine's own types
allow-listed. That changes mmengine for the whole process, so it is never done on import:
``tools/train.py`` and ``tools/test.py`` call it, and so should other code that drives the Runner.
"""
from __future__ import annotations

import copyreg
import glob
import os
import os.path as osp
import re

import torch
from mmengine.fileio import LocalBackend
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

from ..models.checkpoint import atomic_write_bytes, safe_load

#: Name under which the backend is registered with mmengine's file-backend registry.
ATOMIC_BACKEND = 'local_atomic'


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend with atomic ``put`` / ``put_text`` (see :func:`atomic_write_bytes`).

    Select it with ``default_hooks.checkpoint.backend_args=dict(backend='local_atomic')``;
    ``tools/train.py`` does this for every config that does not choose a backend itself.
    """

    def put(self, obj: bytes, filepath: str) -> None:
        atomic_write_bytes(str(filepath), obj)

    def put_text(self, obj: str, filepath: str, encoding: str = 'utf-8') -> None:
        atomic_write_bytes(str(filepath), obj.encode(encoding))


def load_local_weights_only(filename: str, map_location: str | torch.device | None = None) -> dict:
    """mmengine ``CheckpointLoader`` scheme for local files: ``torch.load(weights_only=True)``.

    Raises FileNotFoundError for a missing file and RuntimeError naming the file when it carries
    anything but tensors, containers and mmengine's own logging types.
    """
    return safe_load(osp.expanduser(filename), map_location=map_location or 'cpu')


def _reduce_history_buffer(buffer: HistoryBuffer) -> tuple:
    # mmengine's HistoryBuffer.__getstate__ adds its statistics functions (HistoryBuffer.min, ...),
    # which pickle as getattr(HistoryBuffer, 'min'): weights-only loading would have to allow
    # builtins.getattr for every checkpoint. Those functions live in a class-level table that
    # __setstate__ rebuilds anyway, so the buffers are written without them.
    state = {k: v for k, v in vars(buffer).items() if k != 'statistics_methods'}
    return HistoryBuffer, (), state


def install_weights_only_loading() -> None:
    """Route mmengine's loading of local checkpoints through :func:`load_local_weights_only`, and
    make the checkpoints mmengine writes loadable that way (see ``_reduce_history_buffer``).

    Process-wide and idempotent: it replaces the '' (local path) scheme of mmengine's
    ``CheckpointLoader`` and adds a ``copyreg`` rule for ``HistoryBuffer``. ``tools/train.py`` and
    ``tools/test.py`` call it before building the Runner; ``import hmait`` does not.
    """
    # '' is the scheme mmengine uses for plain local paths; force replaces its bare torch.load.
    CheckpointLoader.register_scheme(prefixes='', loader=load_local_weights_only, force=True)
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)


_STEP_CKPT = re.compile(r'^(epoch|iter)_(\d+)\.pth$')


def find_resume_checkpoint(work_dir: str) -> str | None:
    """The checkpoint to resume from in ``work_dir``, or None when there is none.

    ``last_checkpoint`` names it when it points at an existing file. Otherwise (missing, empty or
    stale after an interrupted run) the newest complete ``epoch_N.pth`` / ``iter_N.pth`` is used;
    incomplete writes never carry those names because checkpoints are renamed into place.
    """
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named and osp.isfile(named):
            return named
    candidates = []
    for path in glob.glob(osp.join(work_dir, '*.pth')):
        match = _STEP_CKPT.match(osp.basename(path))
        if match:
            candidates.append((os.path.getmtime(path), int(match.group(2)), path))
    return max(candidates)[2] if candidates else None
