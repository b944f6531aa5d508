# The two commands a newcomer needs (see README.md):
#   make demo   set up the core (if needed: no mmcv), generate a small ImageNet-format dataset and train H-MaiT on it
#   make test   set up everything (if needed: the core plus mmcv, mmdet, mmseg) and run the whole test suite
PYTHON := .venv/bin/python

.PHONY: setup setup-core demo demo-compare test lint

setup:
	bash tools/setup_env.sh full

# Classification only (torch, timm, mmengine, the project and its CPU kernel): what the demo needs.
setup-core:
	bash tools/setup_env.sh core

demo: setup-core
	$(PYTHON) tools/generate_demo_data.py imagenet data/demo_imagenet --train-per-class 200 --val-per-class 50
	$(PYTHON) tools/train.py configs/hmait_t_demo.py --work-dir work_dirs/hmait_t_demo

# The demo's H-MaiT against the same network with every head global and timm's Swin at the same size,
# same data and recipe, three seeds (about ten demo trainings).
demo-compare: demo
	$(PYTHON) tools/analysis/demo_compare.py --seeds 0 1 2

test: setup
	.venv/bin/ruff check .
	$(PYTHON) -m pytest

lint: setup
	.venv/bin/ruff check .
