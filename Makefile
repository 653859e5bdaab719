# The two commands of the README: `make demo` and `make test`.
# Both create (or reuse) a virtualenv in .venv with everything microDR needs on this machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch's CPU-only wheels (Linux, Windows; on macOS the same wheels as PyPI).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, from PyTorch's CPU wheel index (its `2.13.0+cpu` outranks PyPI's
	# `2.13.0`, which on Linux is the ~3 GB CUDA build). Offline, pip's own configuration
	# (find-links, a local index) still supplies it.
	$(PY) -m pip install -q torch==2.13.0 --extra-index-url $(TORCH_INDEX) --retries 1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job on a bundled task: recover a torus's colors from 6 target images (about 10 s).
demo: $(VENV)/.installed
	$(VENV)/bin/microdr optimize scenes/tasks/colors.json scenes/tasks/colors_targets -o out/colors

test: $(VENV)/.installed
	$(PY) -m pytest -q
