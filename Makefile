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

# The main job on a bundled task: recover a torus's colors from 6 target images (about 10 s).
demo: $(VENV)/.installed
	$(VENV)/bin/microdr optimize scenes/tasks/colors.json scenes/tasks/colors_targets -o out/colors

test: $(VENV)/.installed
	$(PY) -m pytest -q
