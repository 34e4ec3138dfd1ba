# Two entry points a new user runs on a fresh machine (see README):
#   make demo   -- set everything up, then run the demo
#   make test   -- set everything up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test,tensorboard]"
	touch $@

demo: setup
	$(PY) -m dtokd.cli demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/step_time.py

clean:
	rm -rf $(VENV) runs .pytest_cache
