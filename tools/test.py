#!/usr/bin/env python
"""Evaluate a checkpoint with an mmengine config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--cfg-options KEY=VALUE ...]
                                           [--launcher {none,pytorch,slurm}]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hmait.engine.launch import test  # noqa: E402

if __name__ == '__main__':
    test()
