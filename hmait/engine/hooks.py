"""Hooks the classification recipe needs on top of mmengine's defaults."""
from __future__ import annotations

import random

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook


class EpochSeedHook(Hook):
    """Reseed python, numpy and torch at the start of every training epoch from (seed, epoch, rank).

    Mixup and drop path draw from the global generators in the training process. mmengine does not
    store generator states in checkpoints, and validation between epochs consumes random numbers,
    so without this a resumed run would draw different numbers from the uninterrupted one. With it
    the random stream of each epoch depends only on the seed, the epoch and the rank.
    """

    priority = 'VERY_HIGH'

    def before_train_epoch(self, runner) -> None:
        seed = runner.seed if runner.seed is not None else 0
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, runner.epoch, get_rank()]).generate_state(2, np.uint64)
        epoch_seed = int(state[0] >> 1)
        random.seed(epoch_seed)
        np.random.seed(epoch_seed % 2 ** 32)
        torch.manual_seed(epoch_seed)
