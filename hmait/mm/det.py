"""mmdet's CocoDataset with its silent failure modes turned into errors that name the file.

What mmdet 3.3 does by itself: a missing annotation file raises a bare FileNotFoundError from
pycocotools; a file that is not JSON raises a JSONDecodeError that does not say which file;
annotations whose ``category_id`` is not among the file's categories are dropped silently (the
evaluation then scores a different problem than the one annotated); a missing image only fails
when a data loader worker reaches it; a dataset that ends up empty trains zero iterations per
epoch. ``CheckedCocoDataset`` checks all of these while the annotation file is loaded.
"""
from __future__ import annotations

import json
import os

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from ._checks import check_files_exist, is_remote


@DATASETS.register_module()
class CheckedCocoDataset(CocoDataset):
    """``CocoDataset`` that validates the annotation file, category ids and image files when loading."""

    def load_data_list(self) -> list[dict]:
        ann_file = self.ann_file
        if not is_remote(ann_file) and not os.path.isfile(ann_file):
            raise FileNotFoundError(f'COCO annotation file not found: {ann_file} '
                                    '(ann_file joined with data_root)')
        try:
            data_list = super().load_data_list()
        except json.JSONDecodeError as err:
            raise ValueError(f'COCO annotation file {ann_file} is not valid JSON: {err}') from err
        except (KeyError, TypeError, AttributeError) as err:
            # pycocotools indexes 'images', 'annotations', 'categories' and their fields directly.
            raise ValueError(f'COCO annotation file {ann_file} is not in COCO instances format '
                             f'(expected "images", "annotations" and "categories" lists with id fields): '
                             f'{type(err).__name__}: {err}') from err
        check_files_exist((info['img_path'] for info in data_list), 'image', ann_file)
        return data_list

    def parse_data_info(self, raw_data_info: dict) -> dict | list[dict]:
        # self.coco only exists while load_data_list runs, which is the only caller.
        known = self.coco.cats
        for ann in raw_data_info['raw_ann_info']:
            if ann.get('category_id') not in known:
                raise ValueError(
                    f'COCO annotation file {self.ann_file}: annotation id {ann.get("id")} of image '
                    f'{raw_data_info["raw_img_info"].get("file_name")} has category_id '
                    f'{ann.get("category_id")!r}, '
                    f'which is not among the file\'s categories {sorted(known)}')
        return super().parse_data_info(raw_data_info)

    def filter_data(self) -> list[dict]:
        data_list = super().filter_data()
        if not data_list:
            raise ValueError(f'COCO dataset {self.ann_file} has no usable images (after filter_cfg='
                             f'{self.filter_cfg}); an empty dataset would train no iterations')
        return data_list
