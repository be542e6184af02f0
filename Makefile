# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install torch==2.13.0 FIRST (the local CPU wheel), so that
# no dependency pulls in a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# `make test-min`: a second environment with the oldest versions pyproject.toml declares (its `>=` bounds pinned
# by .ci/min_constraints.py), torch==2.13.0 first as everywhere.
VENV_MIN := .venv-min
PY_MIN := $(VENV_MIN)/bin/python
PIP_MIN := $(PY_MIN) -m pip --disable-pip-version-check -q

.PHONY: demo test test-min docs lint type format bench-speed clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[tests,bench,dev,docs,minari]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/offline_pendulum_demo.py

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

test-min:
	test -x $(PY_MIN) || $(PYTHON) -m venv $(VENV_MIN)
	$(PIP_MIN) install torch==2.13.0
	$(PY_MIN) .ci/min_constraints.py tests > $(VENV_MIN)/min-constraints.txt
	$(PIP_MIN) install -c $(VENV_MIN)/min-constraints.txt -e ".[tests]"
	$(PY_MIN) -m pip list --format=freeze | grep -iE "^(torch|stable.baselines3|sb3.contrib|gymnasium|numpy|tqdm|rich|rl.zoo3|optuna)=="
	$(PY_MIN) -m pytest -q -m "not slow" tests

docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs/_build/html/index.html"

lint: $(STAMP)
	$(PY) -m ruff check sb3_hanq tests examples benchmarks
	$(PY) -m ruff format --check sb3_hanq tests examples benchmarks

format: $(STAMP)
	$(PY) -m ruff format sb3_hanq tests examples benchmarks
	$(PY) -m ruff check --fix sb3_hanq tests examples benchmarks

type: $(STAMP)
	$(PY) -m mypy sb3_hanq

bench-speed: $(STAMP)
	$(PY) benchmarks/speed_hanq.py

clean:
	rm -rf $(VENV) $(VENV_MIN) docs/_build build *.egg-info .pytest_cache .mypy_cache .ruff_cache
