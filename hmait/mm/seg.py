"""mmseg's ADE20KDataset with its silent failure modes turned into errors that name the file.

What mmseg 1.2 does by itself: an image folder without images gives an empty dataset (and an
infinite sampler over it never yields); a missing label map only fails when a data loader worker
reaches it; label values outside ``[0, num_classes)`` other than the ignore index are dropped by
``IoUMetric`` without a word (``torch.histc`` ignores them), so mIoU is computed on a different
labelling, or crash the loss with an index error that does not say which file.
A label map whose size differs from its image's is resized with it by the pipeline, so every
pixel gets some other pixel's label without an error.
``CheckedADE20KDataset`` checks the folders and files when loading, and the label-map size and
the label values of every sample it returns.
"""
from __future__ import annotations

import os

import torch
from PIL import Image

from . import mm_import_error

try:
    from mmseg.datasets import ADE20KDataset
    from mmseg.registry import DATASETS
except ImportError as err:  # a core environment: say how to add mmseg
    raise mm_import_error('Segmentation (hmait.mm.seg)', err) from err

from ._checks import check_files_exist, is_remote


@DATASETS.register_module()
class CheckedADE20KDataset(ADE20KDataset):
    """``ADE20KDataset`` that validates folders, label-map files and label values."""

    def load_data_list(self) -> list[dict]:
        img_dir = self.data_prefix.get('img_path', '')
        ann_dir = self.data_prefix.get('seg_map_path')
        for name, folder in (('image', img_dir), ('label map', ann_dir)):
            if folder and not is_remote(folder) and not os.path.isdir(folder):
                raise FileNotFoundError(f'ADE20K {name} folder not found: {folder} '
                                        '(data_prefix joined with data_root)')
        if self.ann_file and not is_remote(self.ann_file) and not os.path.exists(self.ann_file):
            raise FileNotFoundError(f'ADE20K split file not found: {self.ann_file}')
        data_list = super().load_data_list()
        if not data_list:
            raise ValueError(f'no "*{self.img_suffix}" images found in {img_dir}')
        check_files_exist((info['seg_map_path'] for info in data_list if info.get('seg_map_path')),
                          'label map', f'the images in {img_dir}')
        return data_list

    def prepare_data(self, idx: int):
        self._check_sizes(self.get_data_info(idx))
        data = super().prepare_data(idx)
        # Checked after the pipeline: these are exactly the values the loss and IoUMetric will see.
        sample = data.get('data_samples') if isinstance(data, dict) else None
        if sample is not None and 'gt_sem_seg' in sample:
            self._check_labels(sample.gt_sem_seg.data, sample.metainfo)
        return data

    def _check_sizes(self, info: dict) -> None:
        image, labels = info.get('img_path'), info.get('seg_map_path')
        if not image or not labels or is_remote(image) or is_remote(labels):
            return
        # Opening reads the headers only: two small reads per sample.
        with Image.open(image) as img, Image.open(labels) as seg:
            image_size, label_size = img.size, seg.size
        if image_size != label_size:
            raise ValueError(f'label map {labels} is {label_size[0]}x{label_size[1]} (width x height) but its image '
                             f'{image} is {image_size[0]}x{image_size[1]}; a label map must have its image\'s size')

    def _check_labels(self, labels: torch.Tensor, metainfo: dict) -> None:
        num_classes = len(self.metainfo['classes'])
        values = torch.unique(labels)
        bad = values[(values >= num_classes) & (values != self.ignore_index)].tolist()
        if bad:
            shift = (' (after reduce_zero_label subtracted 1: the file values are one higher)'
                     if self.reduce_zero_label else '')
            raise ValueError(f'label map {metainfo.get("seg_map_path")} holds label values {bad[:10]}{shift} '
                             f'outside the {num_classes} classes [0, {num_classes - 1}] and the ignore index '
                             f'{self.ignore_index}')
