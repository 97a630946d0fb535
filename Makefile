# make test: create .venv, install (CPU torch pinned first), build csrc, run the test suite.
# make demo: the same install, then the whole pipeline on the embedded synthetic corpus.
# make bench: the benchmarks that print ratios against in-run baselines.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= demo_output
PYTEST_ARGS ?=

.PHONY: install test demo bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*.cpp)
	$(PIP) install --quiet --upgrade pip
	# Pinned first: the local CPU wheel. Unpinned, pip would pull GBs of CUDA packages.
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet setuptools wheel pybind11
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"
	$(PY) -c "import megatron_longctx.native as n; print('csrc extension:', n.BACKEND)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) tools/demo.py --output-dir $(DEMO_DIR)

bench: $(STAMP)
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_decode.py

clean:
	rm -rf build *.egg-info megatron_longctx/_csrc*.so $(DEMO_DIR)
