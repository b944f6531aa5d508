# The two commands a newcomer needs (see README.md):
#   make demo   set up (if needed), generate a small ImageNet-format dataset and train H-MaiT on it
#   make test   set up (if needed) and run the whole test suite
PYTHON := .venv/bin/python

.PHONY: setup demo test lint

setup:
	bash tools/setup_env.sh

demo: setup
	$(PYTHON) tools/generate_demo_data.py imagenet data/demo_imagenet
	$(PYTHON) tools/train.py configs/hmait_t_demo.py --work-dir work_dirs/hmait_t_demo

test: setup
	.venv/bin/ruff check .
	$(PYTHON) -m pytest

lint: setup
	.venv/bin/ruff check .
