# Two entry points a new user runs on a fresh machine (see README):
#   make demo   -- set everything up (venv, installs, Fashion-MNIST), then run the demo
#   make test   -- set everything up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup fashion-mnist demo test docs bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,tensorboard]"
	# torchtune's KD losses, a reference the token-level losses are tested against: its package
	# imports torchao and pins torchdata, but the losses' own file needs only torch, so the
	# tests read that file and it is installed without its dependencies
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps torchtune==0.6.1
	touch $@

# Debian's dataset-fashion-mnist package when it is missing and apt is at hand; otherwise the
# loader looks in $DTOKD_DATA and tries torchvision's download (see docs/pipeline.md).
fashion-mnist:
	@if [ -f $(FASHION_MNIST) ] || [ -n "$$DTOKD_DATA" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then \
	    echo "installing Debian's dataset-fashion-mnist"; \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null || \
	      echo "could not install dataset-fashion-mnist; the demo will try torchvision's download"; \
	  fi; \
	else echo "no apt-get: the demo will look in \$$DTOKD_DATA, then try torchvision's download"; fi

demo: setup fashion-mnist
	$(PY) -m dtokd.cli demo

test: setup fashion-mnist
	$(PY) -m ruff format --check src tests benchmarks examples docs
	$(PY) -m ruff check src tests benchmarks examples docs
	$(PY) -m mypy
	$(PY) -m pytest -q

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d site
	@echo "built the documentation site into site/ (open site/index.html)"

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache site
