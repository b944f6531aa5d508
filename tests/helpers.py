"""Shared pieces of the test suite: paths, tool runs, small checkpoints."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / 'configs'
DET_CONFIGS = ['mask-rcnn_hmait-t_fpn_1x_coco.py', 'mask-rcnn_hmait-t_fpn_ms-crop-3x_coco.py',
               'mask-rcnn_hmait-s_fpn_ms-crop-3x_coco.py', 'cascade-mask-rcnn_hmait-t_fpn_ms-crop-3x_coco.py',
               'retinanet_hmait-t_fpn_1x_coco.py']
SEG_CONFIGS = ['upernet_hmait-t_8xb2-160k_ade20k-512x512.py', 'upernet_hmait-s_8xb2-160k_ade20k-512x512.py']
# The ImageNet checkpoint every shipped T config points at, relative to the working directory.
T_CHECKPOINT = 'checkpoints/hmait_t_imagenet.pth'
# One block per stage keeps the end-to-end runs within the test-time budget on two CPU cores.
SMALL_DEPTHS = 'model.backbone.depths=[1,1,1,1]'


def require(module: str):
    """Import ``module`` or skip: mmdet/mmseg come with the optional ``mm`` extra."""
    return pytest.importorskip(module)


def run_tool(args: list[str], cwd: Path | str = REPO, env: dict | None = None, timeout: int = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``args`` (a tools/ command line) in this environment; with ``check``, assert it succeeded."""
    full_env = {**os.environ, 'PYTHONPATH': str(REPO), **(env or {})}
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(map(str, args))} exited with {proc.returncode}\n'
                             f'--- stdout (tail) ---\n{proc.stdout[-4000:]}\n'
                             f'--- stderr (tail) ---\n{proc.stderr[-6000:]}')
    return proc


def tool(name: str) -> str:
    return str(REPO / 'tools' / name)


def read_scalars(work_dir: Path) -> list[dict]:
    """Every record mmengine's LocalVisBackend wrote to ``<work_dir>/<timestamp>/vis_data/scalars.json``."""
    records = []
    for path in sorted(work_dir.glob('*/vis_data/scalars.json')):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def save_classification_checkpoint(path: Path, depths: tuple[int, ...] = (1, 1, 1, 1)) -> Path:
    """An ImageNet-style checkpoint as classification training saves it (``backbone.`` + timm keys)."""
    from hmait.engine.classifier import TimmImageClassifier

    model = TimmImageClassifier('hmait_tiny', num_classes=10, model_kwargs=dict(depths=depths))
    torch.save(dict(meta=dict(note='test checkpoint'), state_dict=model.state_dict()), path)
    return path


def python() -> str:
    return sys.executable
