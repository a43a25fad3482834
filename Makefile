PYTHON ?= python3

.PHONY: install demo test lint

install:  ## install the package with its test extra (torch pinned to the CPU build)
	$(PYTHON) -m pip install --quiet -e ".[test]"

demo: install  ## train a tiny model on the bundled corpus, evaluate it, export it
	bash scripts/demo.sh

test:  ## the test suite (8 fake CPU devices, see tests/conftest.py)
	$(PYTHON) -m pytest -q tests

lint:
	$(PYTHON) -m ruff check mistral_jax tests configs train.py eval.py
