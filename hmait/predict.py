"""Top-k classes of image files under a trained classifier: the package side of ``tools/predict.py``.

The model comes from :func:`hmait.builder.build_model` (a timm model name or a classification
config, and a checkpoint that must fit it exactly), so prediction loads weights the way the export
tool does. Images go through timm's evaluation transform with the model's own preprocessing: for a
config, the input size, crop, interpolation and mean/std of its test data loader, the transform
the checkpoint was validated with; for a timm name, the model's ``pretrained_cfg``.

Imports torch, timm and PIL; mmengine's config reader only when a config is given; never the
training package ``hmait.engine``, opencv or the OpenMMLab detection / segmentation libraries.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_data_config, resolve_model_data_config

from .builder import build_model, read_config
from .data.image_folder import IMAGE_EXTENSIONS, class_folder_names, is_image_name
from .ops.checks import check_positive_int

# What a checkpoint file is called; anything else in the first path position is read as an image.
CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin', '.tar', '.safetensors')
# The keys of a timm transform dict that set preprocessing, as resolve_data_config reads them;
# augmentation keys (hflip, auto_augment, ...) do not apply at inference.
_PREPROCESSING_KEYS = ('interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


@dataclass
class ClassScore:
    """One of an image's top-k classes."""
    class_index: int
    class_name: str
    probability: float


@dataclass
class ImagePrediction:
    """The top-k classes of one image, most probable first."""
    path: str
    predictions: list[ClassScore] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def split_checkpoint(paths: Sequence[str]) -> tuple[str | None, list[str]]:
    """Separate the optional CHECKPOINT from the IMAGE_OR_DIR paths that follow CONFIG_OR_MODEL.

    The first path is the checkpoint when it has a checkpoint suffix (:data:`CHECKPOINT_SUFFIXES`),
    or when more paths follow and it is neither a folder nor named like an image. Returns
    ``(checkpoint or None, image paths)``; raises ValueError when no image path remains.
    """
    paths = list(paths)
    if not paths:
        raise ValueError('no IMAGE_OR_DIR given: name at least one image file or folder')
    first = paths[0]
    is_checkpoint = first.lower().endswith(CHECKPOINT_SUFFIXES) or (
        len(paths) > 1 and not os.path.isdir(first) and not is_image_name(first))
    if not is_checkpoint:
        return None, paths
    if len(paths) == 1:
        raise ValueError(f'{first!r} reads as the CHECKPOINT, and no IMAGE_OR_DIR follows it: '
                         'name at least one image file or folder after the checkpoint')
    return first, paths[1:]


def expand_image_paths(inputs: Iterable[str]) -> list[str]:
    """Every image to predict: each file as given, and each folder's image files, recursively and sorted.

    A folder contributes the files named like images (:data:`IMAGE_EXTENSIONS`, any case); a file
    named explicitly is taken whatever its name, and PIL decides later whether it is an image.
    Raises FileNotFoundError for a path that does not exist and ValueError for a folder with no images.
    """
    images: list[str] = []
    for given in inputs:
        path = Path(given)
        if path.is_file():
            images.append(given)
        elif path.is_dir():
            found = sorted(str(p) for p in path.rglob('*') if p.is_file() and is_image_name(p.name))
            if not found:
                raise ValueError(f'IMAGE_OR_DIR {given!r} is a folder without image files (looked for '
                                 f'{", ".join(IMAGE_EXTENSIONS)} in any case, in its sub-folders too)')
            images += found
        else:
            raise FileNotFoundError(f'IMAGE_OR_DIR {given!r} does not exist (neither a file nor a folder)')
    return images


def read_image(path: str) -> Image.Image:
    """The image at ``path`` as RGB; ValueError naming the file when PIL cannot decode it."""
    try:
        with Image.open(path) as img:
            return img.convert('RGB')  # convert() decodes every pixel, so truncated files fail here
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for non-image and damaged files
        raise ValueError(f'cannot read image {path!r}: {err}') from err


def _config_transform(cfg) -> dict:
    """The timm transform dict of the config's test (else val) data set, or {} when it has none."""
    for loader in ('test_dataloader', 'val_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset') or {}
        transform = dataset.get('transform')
        if isinstance(transform, dict):
            return dict(transform)
    return {}


def preprocessing_config(model: nn.Module, cfg=None) -> dict:
    """timm's data config (``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct``,
    ``crop_mode``) for evaluating ``model``.

    With a classification config ``cfg``, the values of its test data loader's transform (the
    shipped configs' ``test_transform``; the demo's ``input_size=64, crop_pct=1.0``), and where
    there is none, its top-level ``img_size`` / ``mean`` / ``std``; gaps are filled from the
    model's ``pretrained_cfg``. Without a config, the model's ``pretrained_cfg`` alone.
    """
    if cfg is None:
        return resolve_model_data_config(model)
    transform = _config_transform(cfg) or {k: cfg[k] for k in ('img_size', 'mean', 'std') if k in cfg}
    args = {k: transform[k] for k in _PREPROCESSING_KEYS if transform.get(k) is not None}
    size = transform.get('input_size', transform.get('img_size'))
    if size is not None:
        # create_transform takes an int or (H, W); resolve_data_config wants (C, H, W).
        size = (size, size) if isinstance(size, int) else tuple(size)
        args['input_size'] = size if len(size) == 3 else (3, *size)
    return resolve_data_config(args, model=model)


def read_class_names_file(path: str, num_classes: int) -> list[str]:
    """One class name per line of ``path`` (surrounding spaces and blank lines ignored), exactly
    ``num_classes`` of them, in class-index order."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--class-names {path!r} does not exist')
    with open(path, encoding='utf-8') as f:
        names = [line.strip() for line in f if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f'--class-names {path!r} holds {len(names)} names (one per non-blank line), '
                         f'but the model has {num_classes} classes')
    return names


def folder_class_names(cfg, num_classes: int) -> list[str] | None:
    """The class names training used: the sorted class folders of the config's data set.

    Looks at the train split (``data_root/train`` in the shipped configs), else the val / test one,
    as ``ImageFolderDataset`` numbers classes; ``data_root`` is relative to the working directory,
    as in training. None when no such folder exists, or (with a warning) when its folder count is
    not ``num_classes``.
    """
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(loader) or {}).get('dataset') or {}
        root = dataset.get('data_root')
        if not root:
            continue
        split_dir = os.path.join(root, dataset.get('split', 'train'))
        if not os.path.isdir(split_dir):
            continue
        names = class_folder_names(split_dir)
        if len(names) == num_classes:
            return names
        warnings.warn(f'{split_dir} has {len(names)} class folders but the model has {num_classes} classes: '
                      'showing class indices instead of names (give --class-names FILE for names)',
                      UserWarning, stacklevel=2)
        return None
    return None


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that this process can use; ValueError naming it otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f'--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}') from err
    if resolved.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {device!r}: CUDA is not available in this process; use --device cpu')
    return resolved


@dataclass
class Predictor:
    """A classifier in eval mode, its evaluation transform and its class names.

    ``transform``: PIL image -> ``(3, H, W)`` float tensor. ``data_config``: the timm data config
    the transform was built from. ``class_names``: one per class index.
    """
    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    data_config: dict
    class_names: list[str]
    device: torch.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, path: str) -> torch.Tensor:
        """The image at ``path`` as the model sees it: ``(3, H, W)`` float, normalised."""
        return self.transform(read_image(path))

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities ``(B, num_classes)`` (float32, on the CPU) of ``(B, 3, H, W)`` images."""
        logits = self.model(images.to(self.device))
        return logits.float().softmax(dim=-1).cpu()

    def predict(self, paths: Sequence[str], topk: int = 5, batch_size: int = 16) -> Iterator[ImagePrediction]:
        """The ``topk`` most probable classes of each image in ``paths``, in order, one batch at a time.

        ``topk`` above the number of classes gives every class. Raises ValueError naming the first
        image that cannot be read; the images before its batch have been yielded by then.
        """
        check_positive_int('topk', topk)
        check_positive_int('batch_size', batch_size)
        k = min(topk, self.num_classes)
        for start in range(0, len(paths), batch_size):
            batch = list(paths[start:start + batch_size])
            probs = self.probabilities(torch.stack([self.preprocess(p) for p in batch]))
            values, indices = probs.topk(k, dim=-1)  # sorted, most probable first
            for path, top_p, top_i in zip(batch, values.tolist(), indices.tolist()):
                yield ImagePrediction(path, [ClassScore(i, self.class_names[i], p) for p, i in zip(top_p, top_i)])


def load_predictor(source: str, checkpoint: str | None = None, class_names_file: str | None = None,
                   device: str | torch.device = 'cpu') -> Predictor:
    """A :class:`Predictor` for ``source``: a timm model name or a classification config (``.py``).

    ``checkpoint`` (mmengine ``.pth`` or state dict) must fit the model exactly, as in
    :func:`hmait.builder.build_model`; without one the model keeps its random initialisation.
    Class names come from ``class_names_file`` (one per line, as many as the model has classes),
    else from the config's data set folders when they exist, else they are the class indices.
    Raises FileNotFoundError / ValueError naming the bad argument (RuntimeError from the checkpoint
    loader for a file that is not a plain weights file).
    """
    device = resolve_device(device)
    model = build_model(source, checkpoint, part='classifier')
    num_classes = getattr(model, 'num_classes', None)
    if not num_classes:
        raise ValueError(f'{source!r} gives no classifier (its model has no class head, e.g. the backbone of a '
                         'detection or segmentation config); prediction needs a classification config or model')
    # build_model has already imported the config's custom_imports; no need to do it again.
    cfg = read_config(source, import_custom_modules=False) if source.endswith('.py') else None
    data_config = preprocessing_config(model, cfg)
    transform = create_transform(**data_config, is_training=False)
    if class_names_file is not None:
        names = read_class_names_file(class_names_file, num_classes)
    else:
        names = (folder_class_names(cfg, num_classes) if cfg is not None else None) or \
            [str(i) for i in range(num_classes)]
    return Predictor(model.to(device), transform, data_config, names, device)


def format_predictions(predictions: Iterable[ImagePrediction]) -> Iterator[str]:
    """Text lines: each image's path, then one ``  probability  index  name`` line per class."""
    for prediction in predictions:
        yield prediction.path
        for score in prediction.predictions:
            yield f'  {score.probability:.4f}  {score.class_index:>4}  {score.class_name}'


def predictions_json(predictions: Iterable[ImagePrediction]) -> str:
    """A JSON list: per image ``{"path", "predictions": [{"class_index", "class_name", "probability"}]}``."""
    return json.dumps([p.to_dict() for p in predictions], indent=1)
