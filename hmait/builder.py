"""One way to build a model and to load weights into it, for every tool of the project.

A *source* is one of:

* a timm model name (``hmait_tiny``, ``mait_small``, ``swin_tiny_patch4_window7_224``, ...);
* a classification config, whose model is
  ``dict(type='TimmImageClassifier', model_name=..., num_classes=..., model_kwargs=dict(...))``;
* an mmdet or mmseg config, whose model has a ``backbone``.

Configs are files (``.py``) or configs shipped in an installed package
(``'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'``). :func:`build_model` gives the part a tool
asks for (``part``):

* ``'auto'``: the timm model of a name or of a classification config (without the training
  wrapper), the backbone of a detection or segmentation config;
* ``'classifier'``: as 'auto', for names and classification configs only;
* ``'backbone'``: the ``model.backbone`` of a detection or segmentation config;
* ``'model'``: the config's whole model, built through mmengine's registry (SyncBN reverted).

Weights (:func:`load_weights`) are read without running pickled code
(:func:`hmait.models.checkpoint.safe_load`) and must fit exactly: every tensor of the model present
in the file with its shape, and nothing else in the file. ``strict=False`` is the deliberate partial
load: the tensors that fit are loaded and the rest is reported, but a file of which nothing fits is
still refused. mmdet and mmseg are imported only when a config needs them (through mmengine's
registry scopes), so the core package stays importable without them.
"""
from __future__ import annotations

import difflib
import os.path as osp
import warnings
from typing import TYPE_CHECKING

import torch.nn as nn

from .models.checkpoint import StateDictFit, extract_state_dict, safe_load, state_dict_fit

PARTS = ('auto', 'classifier', 'backbone', 'model')
# Keys of a backbone's config entry that load weights; a built model gets its weights from load_weights.
_WEIGHT_KEYS = ('init_cfg', 'pretrained')

if TYPE_CHECKING:
    from mmengine.config import Config


def is_config(source) -> bool:
    """Whether ``source`` names a config (a ``Config``, a ``.py`` file or a ``package::path``)."""
    if isinstance(source, str):
        return source.endswith('.py') or '::' in source
    from mmengine.config import Config
    return isinstance(source, Config)


def read_config(source: str | Config, cfg_options: dict | None = None, import_custom_modules: bool = True) -> Config:
    """An mmengine ``Config`` from a file, a package config (``'mmdet::...'``) or a ``Config`` (copied),
    with ``cfg_options`` merged in. FileNotFoundError naming a file that does not exist."""
    from mmengine.config import Config

    # mmengine imports pkg_resources when a config pulls in mmdet or mmseg, and setuptools warns about
    # that deprecated API twice per process: noise no user of this project can act on.
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated as an API', category=UserWarning)

    if isinstance(source, Config):
        cfg = source.copy()
    elif '::' in source:
        from mmengine.hub import get_config
        cfg = get_config(source)
    else:
        if not osp.isfile(source):
            raise FileNotFoundError(f'config file {source!r} does not exist')
        cfg = Config.fromfile(source, import_custom_modules=import_custom_modules)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def create_timm_model(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with H-MaiT's and MaiT's models registered; ValueError
    naming the model and similar registered names when timm does not know it."""
    import timm

    from . import models  # noqa: F401  (registers the hmait_* and mait_* timm models)

    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f'model {name!r} is not a timm model{_similar_models(name)}')
    return timm.create_model(name, **kwargs)


def _similar_models(name) -> str:
    import timm

    close = difflib.get_close_matches(str(name), timm.list_models(), n=5)
    return f'; similar: {", ".join(close)}' if close else f"; H-MaiT and MaiT models: {timm.list_models('*mait*')}"


def classifier_fields(cfg: Config) -> dict:
    """``model_name``, ``num_classes`` and ``model_kwargs`` of a classification config's model."""
    model_cfg = cfg.get('model')
    if not isinstance(model_cfg, dict) or 'model_name' not in model_cfg:
        raise ValueError(f'config {_name(cfg)!r}: expected a classification config whose model is '
                         "dict(type='TimmImageClassifier', model_name=..., num_classes=..., model_kwargs=dict(...))"
                         f'; its model is {_model_type(cfg)}')
    return dict(model_name=model_cfg['model_name'], num_classes=model_cfg.get('num_classes', 1000),
                model_kwargs=dict(model_cfg.get('model_kwargs') or {}))


def build_backbone(cfg: dict) -> nn.Module:
    """A backbone from its config entry (``dict(type=..., **arguments)``), without its pretrained weights.

    ``type='HMaiT'`` builds this project's backbone directly; any other type (``'mmdet.SwinTransformer'``)
    goes through mmengine's registry, which imports the package its scope names.
    """
    args = {k: v for k, v in dict(cfg).items() if k not in _WEIGHT_KEYS}
    if args.get('type') in ('HMaiT', 'mmdet.HMaiT', 'mmseg.HMaiT'):
        from .models import HMaiT
        args.pop('type')
        return HMaiT(**args)
    from mmengine.registry import MODELS
    return MODELS.build(args)


def build_model(source: str | Config, checkpoint: str | None = None, *, part: str = 'auto',
                cfg_options: dict | None = None, strict: bool = True, **timm_kwargs) -> nn.Module:
    """The model of ``source`` (see the module docstring), with ``checkpoint`` loaded, in eval mode.

    ``timm_kwargs`` go to ``timm.create_model`` for a timm name (``features_only=True``,
    ``num_classes``, ...). ``strict=False`` loads only what fits (:func:`load_weights`).
    Raises FileNotFoundError or ValueError naming the source, the part or the checkpoint.
    """
    if part not in PARTS:
        raise ValueError(f'part must be one of {PARTS}, got {part!r}')
    if not is_config(source):
        import timm

        from . import models  # noqa: F401  (registers the hmait_* and mait_* timm models)

        if not timm.is_model(source):
            raise ValueError(f'{source!r} is neither a config file (.py) nor a timm model{_similar_models(source)}')
        if part == 'backbone':
            raise ValueError(f'{source!r} is a timm model name, which has no separate backbone; '
                             'give a detection or segmentation config')
        model = create_timm_model(source, **timm_kwargs)
    else:
        if timm_kwargs:
            raise ValueError(f'{sorted(timm_kwargs)} apply to timm model names; a config fixes its model itself')
        cfg = read_config(source, cfg_options)
        backbone = (cfg.get('model') or {}).get('backbone')
        if part == 'model':
            model = _build_config_model(cfg)
        elif isinstance(backbone, dict) and part in ('auto', 'backbone'):
            model = build_backbone(backbone)
        elif part == 'backbone':
            raise ValueError(f'config {_name(cfg)!r} has no model.backbone; its model is {_model_type(cfg)}')
        else:
            fields = classifier_fields(cfg)
            model = create_timm_model(fields['model_name'], num_classes=fields['num_classes'],
                                      **fields['model_kwargs'])
    if checkpoint is not None:
        load_weights(model, checkpoint, strict=strict)
    model.eval()  # mmdet's backbones return None from train(), so no chaining
    return model


def _build_config_model(cfg: Config) -> nn.Module:
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope

    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model_cfg = cfg.model.copy()
    if isinstance(model_cfg.get('backbone'), dict):
        # Weights come from load_weights, never from the config: nothing may be downloaded.
        model_cfg.backbone = {k: v for k, v in model_cfg.backbone.items() if k not in _WEIGHT_KEYS}
    return revert_sync_batchnorm(MODELS.build(model_cfg))


def read_state_dict(path: str, own: dict) -> dict:
    """The state dict in the checkpoint at ``path``, keyed as a model with state dict ``own`` keys it.

    Reads safely; unwraps mmengine's ``state_dict`` and DDP's ``module.``; strips a ``backbone.``
    prefix (keeping only those keys) unless the model's own keys carry that prefix too, so a
    classifier's or a detector's checkpoint loads into its timm model or backbone.
    """
    state_dict = extract_state_dict(safe_load(path), prefix='module.')
    if not any(k.startswith('backbone.') for k in own) and any(k.startswith('backbone.') for k in state_dict):
        state_dict = extract_state_dict(state_dict, prefix='backbone.')
    return state_dict


def weights_fit(model: nn.Module, path: str) -> tuple[dict, StateDictFit]:
    """``(state_dict, fit)``: the checkpoint's tensors as :func:`read_state_dict` keys them, and how they
    fit ``model``."""
    own = model.state_dict()
    state_dict = read_state_dict(path, own)
    return state_dict, state_dict_fit(own, state_dict)


def refuse_misfit(path: str, model: nn.Module, fit: StateDictFit, strict: bool = True,
                  partial_hint: str = '') -> None:
    """ValueError naming the first mismatches (with shapes) when ``fit`` is not good enough:
    any misfit when ``strict``, nothing that fits otherwise."""
    if fit.exact or (not strict and fit.matched):
        return
    hint = ''
    if any('soft_mask_logit' in k for k in fit.missing + fit.unexpected):
        hint = ' (soft_mask_logit keys differ: the model and the checkpoint use different mask modes)'
    what = f'{len(fit.matched)} of its tensors fit' if fit.matched else 'none of its tensors fits'
    raise ValueError(f'checkpoint {path} does not fit the model ({type(model).__name__}; {what}){hint}: '
                     f'{fit.describe()}{partial_hint if strict and fit.matched else ""}')


def load_weights(model: nn.Module, path: str, strict: bool = True) -> StateDictFit:
    """Load the checkpoint at ``path`` into ``model``: every tensor must fit (``strict``), or, with
    ``strict=False``, those that fit are loaded. Returns the fit; ValueError when it is not enough."""
    state_dict, fit = weights_fit(model, path)
    refuse_misfit(path, model, fit, strict)
    model.load_state_dict({k: state_dict[k] for k in fit.matched}, strict=strict)
    return fit


def _name(cfg: Config) -> str:
    return getattr(cfg, 'filename', None) or '<config>'


def _model_type(cfg: Config) -> str:
    model_cfg = cfg.get('model')
    return repr(model_cfg.get('type')) if isinstance(model_cfg, dict) else repr(model_cfg)
