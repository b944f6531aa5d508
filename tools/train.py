#!/usr/bin/env python
"""Train with an mmengine config: classification (hmait), detection (mmdet) or segmentation (mmseg).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp] [--auto-scale-lr]
                                 [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm}]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hmait.engine.launch import train  # noqa: E402

if __name__ == '__main__':
    train()
