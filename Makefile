# make test: create .venv, install (CPU torch pinned first), build csrc, run the test suite.
# make demo: the same install, then the whole pipeline on the embedded synthetic corpus.
# make ablation: the demo's stage 1, then every stage-2 mixture arm from it (6 arms x 3 seeds,
#   200 stage-2 steps x 8,192 tokens each; mean and 95% interval over seeds; docs/demo.md "`make
#   ablation`"; ~42 minutes on 2 idle cores from a fresh clone; resumable: rerun to continue).
# make bench: the benchmarks that print ratios against in-run baselines.
# make gpu-wheels: wheels a bare GPU machine lacks (cp312 manylinux x86_64) into gpu-wheels/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
DEMO_DIR ?= demo_output
ABLATION_DIR ?= ablation_output
ABLATION_FLAGS ?= --stage2-iters 200 --seeds 3
PYTEST_ARGS ?=

.PHONY: install test demo ablation bench lint clean gpu-wheels

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml $(wildcard csrc/*.cpp)
	$(PIP) install --quiet --upgrade pip
	# Pinned first: the local CPU wheel. Unpinned, pip would pull GBs of CUDA packages.
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet setuptools wheel pybind11
	$(PIP) install --quiet --no-build-isolation -e ".[dev]"
	$(PY) -c "import megatron_longctx.data.native as n; print('csrc extension:', n.BACKEND)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) tools/demo.py --output-dir $(DEMO_DIR)

ablation: $(STAMP)
	$(PY) tools/demo.py --ablation --output-dir $(ABLATION_DIR) $(ABLATION_FLAGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_decode.py

# The GPU machine (docs/gpu-validation.md) has Python 3.12, torch, transformers, tokenizers,
# matplotlib, tensorboard, psutil, click/joblib/regex/tqdm, but not these; no internet there, so
# they travel with the command (at most 64 MiB with the working tree; these are ~10 MiB).
# defusedxml: nltk's only dependency that image lacks; wonderwords: the RULER-style suite's word
# lists (eval/ruler_tasks.py). No TE: its CUDA wheel is ~190 MB.
GPU_WHEELS_DIR ?= gpu-wheels
GPU_WHEELS ?= megatron-core==0.16.1 nltk==3.10.4 zstandard==0.25.0 defusedxml==0.7.1 \
	wonderwords==3.0.1
GPU_PLATFORMS := $(foreach n,2_17 2_24 2_27 2_28 2_34,--platform manylinux_$(n)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64

gpu-wheels: $(PY)
	rm -rf $(GPU_WHEELS_DIR) && mkdir -p $(GPU_WHEELS_DIR)
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS_DIR) $(GPU_WHEELS)
	@ls -l $(GPU_WHEELS_DIR)
	@size=$$(du -sm $(GPU_WHEELS_DIR) | cut -f1); echo "$(GPU_WHEELS_DIR): $$size MiB"; \
		test $$size -lt 48 || { echo "over 48 MiB: the tree + wheels must stay under 64"; exit 1; }

clean:
	rm -rf build *.egg-info megatron_longctx/_csrc*.so $(DEMO_DIR) $(ABLATION_DIR)
