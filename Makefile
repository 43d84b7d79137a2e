# Two commands set up a fresh machine and run everything (see README.md):
#   make demo   install into .venv, train recipes/vsepp.toml on the built-in data, print the R@K table
#   make test   install into .venv, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test docs browser

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

test: setup browser
	$(VENV)/bin/pytest -q

# tests/test_serve.py drives the web page in a real headless Chromium: Debian's, installed here when missing
# (the test skips, loudly, only where it cannot be installed).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "WARNING: Chromium could not be installed: the web page's browser test will be skipped"

docs: setup
	$(PY) docs/generate.py
