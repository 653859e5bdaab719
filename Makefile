# The two commands of the README: `make demo` and `make test`.
# Both create (or reuse) a virtualenv in .venv with everything microDR needs on this machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: its CPU wheel. An unpinned torch would pull ~3 GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/microdr render scenes/cube.json -o out/cube.png

test: $(VENV)/.installed
	$(PY) -m pytest -q
