"""``import hmait`` registers models and changes nothing else in the process.

Each check runs in a fresh interpreter, since pytest's own process has long imported everything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Snapshots of every table that hmait's training machinery is known to change (mmengine's
# checkpoint loaders, pickle's reduction table, timm's augmentation ops, torch's weights-only
# allow-list), before and after `import hmait`, `import hmait.engine`, and the explicit
# install_weights_only_loading() call that must change them.
TABLES_SCRIPT = r'''
import copyreg, json
import torch
from mmengine.runner.checkpoint import CheckpointLoader
from timm.data import auto_augment

def snapshot():
    return dict(
        loaders={prefix: f'{fn.__module__}.{fn.__qualname__}' for prefix, fn in CheckpointLoader._schemes.items()},
        copyreg=sorted(f'{k.__module__}.{k.__qualname__}' for k in copyreg.dispatch_table),
        name_to_op={name: f'{fn.__module__}.{fn.__qualname__}' for name, fn in auto_augment.NAME_TO_OP.items()},
        safe_globals=sorted(map(str, torch.serialization.get_safe_globals())))

result = dict(before=snapshot())
import timm, hmait
timm.create_model('hmait_tiny')
result['after_hmait'] = snapshot()
import hmait.engine
from mmengine.registry import DATASETS, HOOKS, MODELS
result['registered'] = [MODELS.get('HMaiT') is not None, MODELS.get('TimmImageClassifier') is not None,
                        DATASETS.get('ImageFolderDataset') is not None, HOOKS.get('IterSeedHook') is not None]
result['after_engine'] = snapshot()
hmait.engine.install_weights_only_loading()
result['after_install'] = snapshot()
print(json.dumps(result))
'''

MODULES_SCRIPT = r'''
import json, sys
import timm, hmait
model = timm.create_model('hmait_tiny')
from mmengine.registry import MODELS
print(json.dumps(dict(heavy=sorted(m for m in ('hmait.engine', 'mmengine.runner', 'cv2', 'mmdet', 'mmseg', 'mmcv')
                                   if m in sys.modules),
                      registered=MODELS.get('HMaiT') is not None, timm_model=type(model).__name__)))
'''


def _run(script: str) -> dict:
    proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_hmait_leaves_mmengine_timm_pickle_and_torch_tables_alone():
    result = _run(TABLES_SCRIPT)
    before = result['before']
    assert result['after_hmait'] == before
    # Importing the training package registers classes, and still changes no other table.
    assert result['registered'] == [True, True, True, True]
    assert result['after_engine'] == before
    # The explicit call does change them: the snapshots above would have seen a change.
    installed = result['after_install']
    assert installed['loaders'][''] == 'hmait.engine.checkpoint.load_local_weights_only' != before['loaders']['']
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in set(installed['copyreg']) - set(before['copyreg'])
    assert installed['name_to_op'] == before['name_to_op'], 'posterize is fixed per transform, not in timm'


def test_import_hmait_needs_neither_the_engine_nor_opencv():
    result = _run(MODULES_SCRIPT)
    assert result['heavy'] == [], f'import hmait + timm.create_model imported {result["heavy"]}'
    assert result['registered'] and result['timm_model'] == 'HMaiTClassifier'


# The core environment (`make setup-core`, what `make demo` builds) has no mmcv, mmdet or mmseg: the
# classification stack must import without them, and the det/seg modules must say how to add them.
CORE_ENV_SCRIPT = r'''
import importlib, json, sys
for name in ('mmcv', 'mmdet', 'mmseg'):
    sys.modules[name] = None  # what an environment without them gives: ImportError on import
import hmait, hmait.engine, hmait.predict
from mmengine.config import Config
cfg = Config.fromfile('configs/hmait_t_demo.py')
errors = {}
for module in ('hmait.mm.det', 'hmait.mm.seg'):
    try:
        importlib.import_module(module)
    except ImportError as err:
        errors[module] = str(err)
print(json.dumps(dict(errors=errors, model=cfg.model.type)))
'''


def test_classification_imports_without_mmcv_and_det_seg_say_how_to_add_it():
    result = _run(CORE_ENV_SCRIPT)
    assert result['model'] == 'TimmImageClassifier'
    assert sorted(result['errors']) == ['hmait.mm.det', 'hmait.mm.seg']
    for module, message in result['errors'].items():
        task = 'Detection' if module.endswith('det') else 'Segmentation'
        assert message.startswith(f'{task} ({module}) needs mmcv'), message
        assert "run 'make setup'" in message and 'mm' in message
