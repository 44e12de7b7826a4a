# Both commands set themselves up on a fresh machine: a venv in .venv with the CPU build of torch
# (installed first: a bare `torch` requirement can pull a multi-GB CUDA build), jax and flax.
# `make report ARGS=--full` passes flags to the report (`python -m parity_tests --help`).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PIP := $(PY) -m pip install --progress-bar off

.PHONY: test report
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto

report: $(VENV)/.installed
	$(PY) -m parity_tests $(ARGS)

$(VENV)/.installed: pyproject.toml
	@echo "== creating the virtual environment $(VENV)"
	python3 -m venv $(VENV)
	@echo "== installing torch==2.13.0 (the CPU build, first; a few minutes on a fresh machine)"
	$(PIP) torch==2.13.0
	@echo "== installing this package, editable, with its [dev] extra (jax, flax, pytest, hypothesis, tqdm, matplotlib: see pyproject.toml)"
	$(PIP) -e '.[dev]'
	@$(PY) -c "import flax, jax, torch; print(f'== installed torch {torch.__version__}, jax {jax.__version__}, flax {flax.__version__} in $(VENV)')"
	touch $@
