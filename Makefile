# Two commands set up a fresh machine and run everything (see README.md):
#   make demo   install into .venv, train recipes/vsepp.toml on the built-in data, print the R@K table
#   make test   install into .venv, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test docs

setup: $(VENV)/.installed

# torch==2.13.0 is pinned exactly: it is the CPU wheel on local disk; a looser pin pulls CUDA.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/itmkit train recipes/vsepp.toml

test: setup
	$(VENV)/bin/pytest -q

docs: setup
	$(PY) docs/generate.py
