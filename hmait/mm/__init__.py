"""Optional OpenMMLab integration: dataset classes registered with mmdet and mmseg.

Unlike the core package, these modules import mmdet or mmseg, so nothing in ``hmait`` imports
them; configs do, through ``custom_imports``:

* ``hmait.mm.det`` registers ``CheckedCocoDataset`` in mmdet's DATASETS registry;
* ``hmait.mm.seg`` registers ``CheckedADE20KDataset`` in mmseg's DATASETS registry.
"""
