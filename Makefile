# segtrain: `make install` then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# CPU-only machines get the CPU wheel: a local one if pip's find-links has it, else
# PyTorch's CPU index. A machine with an NVIDIA driver gets the default (CUDA) wheel.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install test test-gpu test-slow lint train bench clean

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the CUDA build of torch"; \
		$(BIN)/pip install "torch>=2.5"; \
	elif $(BIN)/pip download -q --no-index --no-deps -d $(VENV)/.torch-probe "torch==$(TORCH_VERSION)" >/dev/null 2>&1; then \
		echo "No GPU: installing the local CPU wheel torch==$(TORCH_VERSION)"; \
		$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	else \
		echo "No GPU: installing torch==$(TORCH_VERSION) from the CPU index"; \
		$(BIN)/pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	rm -rf $(VENV)/.torch-probe
	$(BIN)/pip install -e ".[dev,export,tracking]"
	$(BIN)/python -c "import torch, segtrain; print('segtrain ready, torch', torch.__version__)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pytest-xdist: one worker per core (TEST_WORKERS=0 runs in this process); the 10 slowest
# tests are printed at the end so a slow newcomer shows up in every run.
TEST_WORKERS ?= auto
test:
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=10

# the tests marked cuda (tests/test_gpu.py): each skips cleanly where CUDA is absent;
# scripts/gpu_check.sh runs this, then the bench's CUDA section, and writes docs/gpu.md
GPU_TEST_ARGS ?=
test-gpu:
	$(BIN)/python -m pytest -m cuda -v -rs $(GPU_TEST_ARGS)

test-slow:
	$(BIN)/python -m pytest -m slow -n $(TEST_WORKERS) --dist loadscope --durations=10

lint:
	$(BIN)/ruff check segtrain tests scripts

train:
	$(BIN)/python -m segtrain

bench:    ## segtrain against a bare PyTorch loop, data, eval modes, CPU knobs (scripts/bench.py)
	$(BIN)/python scripts/bench.py $(if $(CAMVID),--camvid $(CAMVID))

clean:
	rm -rf outputs multirun .pytest_cache
