# `make demo` and `make test` do all set-up on a fresh machine: a .venv with torch, the package and
# its compiled extension. Override the torch pin with TORCH_SPEC="torch==X torchvision==Y".
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MAX_JOBS   ?= 2
RUFF_SPEC  ?= ruff==0.17.6
CUDA_HOME  ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
PY         := $(VENV)/bin/python
PYTEST_ARGS ?=
SOURCES    := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

export MAX_JOBS CUDA_HOME

.PHONY: all build lint test demo bench bench-vendor gpu-check info clean

all: test

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet setuptools wheel ninja pytest pytest-benchmark numpy decord av pyyaml tqdm safetensors tensorboard matplotlib $(RUFF_SPEC)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

info: build
	$(VENV)/bin/dualvar info

# The linter (rules in pyproject.toml) runs before the tests: `make test` fails on a lint error.
lint: $(VENV)/.deps
	$(PY) -m ruff check .

test: build lint
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/dualvar demo

bench: build
	$(PY) -m pytest bench -q --benchmark-only --benchmark-columns=median,iqr,min,rounds $(PYTEST_ARGS)

# Third-party anchors for the GPU benchmark, carried to the GPU machine (which has no network).
bench-vendor:
	mkdir -p bench/vendor && $(PY) -m pip download --no-deps --dest bench/vendor inf-cl

# On a lent GPU machine (no network, its own python3 with torch): build in place, run the
# GPU tests and the GPU benchmarks, write everything under $$OUT.
gpu-check:
	MAX_JOBS=16 bash bench/gpu_check.sh  # the machine has 16 cores; MAX_JOBS ?= 2 above is for this one

clean:
	rm -rf build *.egg-info kernels/_C*.so kernels/_build_config.py $(VENV)/.built
