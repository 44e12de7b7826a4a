# Both commands set themselves up on a fresh machine: a venv in .venv with the CPU build of torch
# (installed first: a bare `torch` requirement can pull a multi-GB CUDA build), jax and flax.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test report
test: $(VENV)/.installed
	$(PY) -m pytest -q

report: $(VENV)/.installed
	$(PY) -m parity_tests

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@
