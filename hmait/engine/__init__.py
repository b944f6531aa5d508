"""Training machinery on mmengine: classifier, ImageNet-folder data, metric, hooks and checkpoint I/O.

Imports torch, timm and mmengine only; ``hmait.registry`` registers these classes.
"""
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
from .hooks import EpochSeedHook
from .metric import TopKAccuracy

__all__ = ['ATOMIC_BACKEND', 'AtomicLocalBackend', 'EpochSeedHook', 'ImageFolderDataset', 'SeededSampler',
           'TimmImageClassifier', 'TopKAccuracy', 'atomic_write_bytes', 'find_resume_checkpoint',
           'install_weights_only_loading', 'load_local_weights_only']
