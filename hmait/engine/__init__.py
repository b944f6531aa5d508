"""Training machinery on mmengine: classifier, ImageNet-folder data, metric, hooks and checkpoint I/O.

Imports torch, timm and mmengine (including ``mmengine.runner``, hence opencv); ``import hmait``
does not import this package. Importing it registers its classes in mmengine's root registries
(``TimmImageClassifier``, ``ImageFolderDataset``, ``SeededSampler``, ``TopKAccuracy``,
``IterSeedHook``, ``UnreadableImagesHook``) and the ``local_atomic`` file backend, and changes
nothing else: the classification configs name it in ``custom_imports``.

Weights-only checkpoint loading is a process-wide change to mmengine's loader, so it is applied
explicitly: ``tools/train.py`` and ``tools/test.py`` call :func:`install_weights_only_loading`
before building the Runner; code that drives mmengine's Runner itself should call it too.
"""
from mmengine.fileio import register_backend
from mmengine.registry import DATA_SAMPLERS, DATASETS, HOOKS, METRICS, MODELS

from .checkpoint import (
                         ATOMIC_BACKEND,
                         AtomicLocalBackend,
                         atomic_write_bytes,
                         find_resume_checkpoint,
                         install_weights_only_loading,
                         load_local_weights_only,
)
from .classifier import TimmImageClassifier
from .dataset import ImageFolderDataset, SeededSampler
from .hooks import IterSeedHook, UnreadableImagesHook
from .metric import TopKAccuracy

MODELS.register_module(name='TimmImageClassifier', module=TimmImageClassifier)
DATASETS.register_module(name='ImageFolderDataset', module=ImageFolderDataset)
DATA_SAMPLERS.register_module(name='SeededSampler', module=SeededSampler)
METRICS.register_module(name='TopKAccuracy', module=TopKAccuracy)
HOOKS.register_module(name='IterSeedHook', module=IterSeedHook)
HOOKS.register_module(name='UnreadableImagesHook', module=UnreadableImagesHook)
register_backend(ATOMIC_BACKEND, AtomicLocalBackend)

__all__ = ['ATOMIC_BACKEND', 'AtomicLocalBackend', 'IterSeedHook', 'ImageFolderDataset', 'SeededSampler',
           'TimmImageClassifier', 'TopKAccuracy', 'UnreadableImagesHook', 'atomic_write_bytes',
           'find_resume_checkpoint', 'install_weights_only_loading', 'load_local_weights_only']
