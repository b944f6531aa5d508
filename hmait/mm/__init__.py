"""Optional OpenMMLab integration: dataset classes registered with mmdet and mmseg.

Unlike the core package, these modules import mmdet or mmseg, so nothing in ``hmait`` imports
them; configs do, through ``custom_imports``:

* ``hmait.mm.det`` registers ``CheckedCocoDataset`` in mmdet's DATASETS registry;
* ``hmait.mm.seg`` registers ``CheckedADE20KDataset`` in mmseg's DATASETS registry.

A core environment (``make setup-core``, which ``make demo`` uses) has none of mmcv, mmdet and
mmseg; importing these modules there raises an ImportError that says how to add them.
"""
from __future__ import annotations


def mm_import_error(task: str, err: ImportError) -> ImportError:
    """The ImportError to raise when ``task``'s OpenMMLab packages are missing: what failed and how to add them."""
    return ImportError(
        f"{task} needs mmcv with its ops, mmdet and mmsegmentation, and importing them failed ({err}). The core "
        "set-up ('make setup-core', which 'make demo' runs) installs classification only: run 'make setup' to add "
        "them to .venv, or install the project's 'mm' extra with an mmcv built with its ops.")
