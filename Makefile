PYTHON ?= python3
# Extra arguments for the pip install of `make install`, e.g. PIP_INSTALL_ARGS="-c .ci/py312-constraints.txt"
# (the constraints of .ci/run's Python 3.12 stage).
PIP_INSTALL_ARGS ?=

.PHONY: check-venv install install-light demo test test-fast test-light lint

check-venv:
	@$(PYTHON) -c 'import os, sys; sys.exit(0 if sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") or os.environ.get("MISTRAL_JAX_SYSTEM_INSTALL") else "make install: $(PYTHON) is not in a virtualenv, and installing would change the system Python. Fix: python3 -m venv .venv && . .venv/bin/activate, then run make again (or set MISTRAL_JAX_SYSTEM_INSTALL=1 to install anyway).")'

# Both `make demo` and `make test` start with `make install`, so each works on its own in a fresh virtualenv:
#   python3 -m venv .venv && . .venv/bin/activate && make demo && make test
install: check-venv  ## the package with its test extra (eval + tpu extras, torch pinned to the CPU build, the oracles)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[test]" $(PIP_INSTALL_ARGS)

install-light: check-venv  ## the package with its light extra only: pytest, no torch / transformers / trl / lm-eval
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[light]" $(PIP_INSTALL_ARGS)

demo: install  ## train a tiny model on the bundled corpus, evaluate it, export it
	PYTHON=$(PYTHON) bash scripts/demo.sh

test: install  ## the test suite (8 fake CPU devices, see tests/conftest.py)
	$(PYTHON) -m pytest -q tests

# Three tiers, each containing the one before: light (no oracle is imported: runs where torch is not installed),
# fast (`-m "not slow"`, with the oracles), full. Markers: pyproject.toml [tool.pytest.ini_options].
test-light: install-light  ## the light tier (under 90 s on 2 CPU cores): not slow, not heavy, no oracle (blocked)
	MISTRAL_JAX_TEST_TIER=light $(PYTHON) -m pytest -q -m "not slow and not heavy and not oracle" tests

test-fast: install  ## the fast tier: every test not marked slow (under 3 minutes on 2 CPU cores)
	$(PYTHON) -m pytest -q -m "not slow" tests

lint:
	$(PYTHON) -m ruff check .
