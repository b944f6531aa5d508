"""mmdet's CocoDataset with its silent failure modes turned into errors that name the file.

What mmdet 3.3 does by itself: a missing annotation file raises a bare FileNotFoundError from
pycocotools; a file that is not JSON raises a JSONDecodeError that does not say which file;
annotations whose ``category_id`` is not among the file's categories are dropped silently (the
evaluation then scores a different problem than the one annotated); a missing image only fails
when a data loader worker reaches it; a dataset that ends up empty trains zero iterations per
epoch; an annotation that lacks a key fails deep inside mmdet with a bare KeyError; a box with a
negative width or height is dropped without a word. ``CheckedCocoDataset`` checks all of these
while the annotation file is loaded, and every error names the file and the offending entry.
Boxes of zero width or height are still dropped by mmdet's own filter, as in mmdet.
"""
from __future__ import annotations

import json
import math
import os

from . import mm_import_error

try:
    from mmdet.datasets import CocoDataset
    from mmdet.datasets.api_wrappers import COCO
    from mmdet.registry import DATASETS
except ImportError as err:  # a core environment: say how to add mmdet
    raise mm_import_error('Detection (hmait.mm.det)', err) from err

from ._checks import check_files_exist, is_remote

# The keys mmdet's CocoDataset reads without a default. 'annotations' may be absent (test-dev
# image-info files have none); 'categories' and 'images' may not.
_TOP_KEYS = ('images', 'categories')
_IMAGE_KEYS = ('id', 'file_name', 'width', 'height')
_ANN_KEYS = ('id', 'image_id', 'category_id', 'bbox')


def check_coco_content(content: dict, ann_file: str) -> None:
    """Raise ValueError naming ``ann_file`` and the entry when a COCO instances dict is malformed.

    Checks: the top-level lists, the keys mmdet reads from every image and annotation, that each
    annotation's ``image_id`` is a listed image and its ``category_id`` a listed category, and that
    every ``bbox`` is ``[x, y, width, height]`` of finite numbers with width and height >= 0.
    """
    def fail(what: str) -> None:
        raise ValueError(f'COCO annotation file {ann_file}: {what}')

    if not isinstance(content, dict):
        fail(f'expected a JSON object with "images", "annotations" and "categories", got {type(content).__name__}')
    for key in _TOP_KEYS:
        if key not in content:
            fail(f'lacks the top-level key "{key}" (a COCO instances file has "images", "annotations" '
                 'and "categories" lists)')
    for key in (*_TOP_KEYS, 'annotations'):
        if key in content and not isinstance(content[key], list):
            fail(f'"{key}" must be a list, got {type(content[key]).__name__}')
    for what, entries, keys in (('category', content['categories'], ('id',)),
                                ('image', content['images'], _IMAGE_KEYS),
                                ('annotation', content.get('annotations', []), _ANN_KEYS)):
        for index, entry in enumerate(entries):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                name = f' id {entry["id"]}' if isinstance(entry, dict) and 'id' in entry else ''
                fail(f'{what} number {index}{name} lacks the key(s) {missing} (each {what} needs {list(keys)})')
    image_ids = {img['id'] for img in content['images']}
    category_ids = {cat['id'] for cat in content['categories']}
    for ann in content.get('annotations', []):
        where = f'annotation id {ann["id"]} (image_id {ann["image_id"]})'
        if ann['image_id'] not in image_ids:
            fail(f'{where} refers to an image id that is not among the file\'s images')
        if ann['category_id'] not in category_ids:
            fail(f'{where} has category_id {ann["category_id"]!r}, which is not among the file\'s categories '
                 f'{sorted(category_ids)}')
        box = ann['bbox']
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in box)):
            fail(f'{where} has bbox {box!r}; expected [x, y, width, height], four finite numbers')
        if box[2] < 0 or box[3] < 0:
            side = 'width' if box[2] < 0 else 'height'
            fail(f'{where} has bbox {box!r} with a negative {side}; COCO boxes are [x, y, width, height] '
                 'with width and height >= 0')


class _CheckedCOCO(COCO):
    """mmdet's COCO API that validates the file's content (see :func:`check_coco_content`) before
    pycocotools indexes it, which is where a missing key would otherwise raise a bare KeyError."""

    def __init__(self, annotation_file: str | None = None):
        self._source = annotation_file
        super().__init__(annotation_file)

    def createIndex(self) -> None:  # noqa: N802  (pycocotools' name)
        if self._source is not None:
            check_coco_content(self.dataset, self._source)
        super().createIndex()


@DATASETS.register_module()
class CheckedCocoDataset(CocoDataset):
    """``CocoDataset`` that validates the annotation file, category ids and image files when loading."""

    COCOAPI = _CheckedCOCO

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

    def filter_data(self) -> list[dict]:
        data_list = super().filter_data()
        if not data_list:
            raise ValueError(f'COCO dataset {self.ann_file} has no usable images (after filter_cfg='
                             f'{self.filter_cfg}); an empty dataset would train no iterations')
        return data_list
