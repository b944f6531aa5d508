"""Hooks the classification recipe needs on top of mmengine's defaults."""
from __future__ import annotations

import random

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook


class IterSeedHook(Hook):
    """Reseed python, numpy and torch before every training iteration from (seed, iteration, rank).

    Mixup/CutMix and drop path draw from the global generators in the training process. mmengine
    does not store generator states in checkpoints, and other code draws from the same generators
    between iterations a different number of times in a resumed run than in an uninterrupted one:
    validation, and above all torch's ``DataLoader``, which draws its workers' base seed from the
    global torch generator whenever it starts them. With ``persistent_workers=True`` that happens
    in the first epoch of a run only, so per-epoch reseeding left a resumed run one draw off (and
    its drop-path masks different) in its first epoch. Reseeding right before each iteration makes
    the numbers an iteration draws depend only on the seed, the iteration and the rank, whatever
    ran before it; that also covers iteration-based loops and checkpoints.
    """

    priority = 'VERY_HIGH'

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        seed = runner.seed if runner.seed is not None else 0
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, runner.iter, get_rank()]).generate_state(2, np.uint64)
        iter_seed = int(state[0] >> 1)
        random.seed(iter_seed)
        np.random.seed(iter_seed % 2 ** 32)
        torch.manual_seed(iter_seed)


class UnreadableImagesHook(Hook):
    """Log how many unreadable images the data sets skipped, after every training, validation and test epoch.

    ``ImageFolderDataset(on_corrupt='skip')`` warns once per file from whichever process read it
    (often a data loader worker, whose warnings are easy to miss); this puts the running count and
    the first paths in the run's log, once more files have been skipped since the last report.
    """

    priority = 'LOW'

    def __init__(self, max_listed: int = 10):
        if isinstance(max_listed, bool) or not isinstance(max_listed, int) or max_listed < 0:
            raise ValueError(f'max_listed must be a non-negative integer, got {max_listed!r}')
        self.max_listed = max_listed
        self._reported: dict[str, int] = {}

    def _report(self, runner, split: str, loop_name: str) -> None:
        loop = getattr(runner, loop_name, None)
        dataset = getattr(getattr(loop, 'dataloader', None), 'dataset', None)
        files = getattr(dataset, 'unreadable_files', None)
        if not files or len(files) <= self._reported.get(split, 0):
            return
        self._reported[split] = len(files)
        shown = ', '.join(files[:self.max_listed]) + (' ...' if len(files) > self.max_listed else '')
        runner.logger.warning(f'{split} data: {len(files)} unreadable image(s) skipped so far '
                              f'(on_corrupt="skip"): {shown}')

    def after_train_epoch(self, runner) -> None:
        self._report(runner, 'train', '_train_loop')

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._report(runner, 'val', '_val_loop')

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._report(runner, 'test', '_test_loop')
