# Two entry points, each doing all of its own set-up (idempotently):
#   make demo   run the built-in demo batch (tiny models on the CPU, or your GPU)
#   make test   run the test suite
# and, on a GPU machine:
#   make gpu    add turbodiffusion's CUDA kernels (SLA attention, int8 linears) to the venv, built
#               against the venv's torch; needs a CUDA build of torch and the CUDA toolkit's nvcc.
#               Without them a GPU run falls back to plain-torch SLA/int8: right, but slower.
PYTHON ?= python3
VENV ?= .venv
# On a CPU machine this is a CPU build; on a GPU machine PyPI's default build brings CUDA.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-demo gpu

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

gpu: $(STAMP)
	@command -v nvcc >/dev/null 2>&1 || { echo "make gpu: nvcc not found: install the CUDA toolkit (the version of the venv's torch build) and put its bin folder on PATH" >&2; exit 1; }
	@$(BIN)/python -c 'import torch; assert torch.version.cuda' 2>/dev/null || { echo "make gpu: the venv's torch is not a CUDA build: reinstall it from PyPI's CUDA wheels on a GPU machine (rm -rf $(VENV) && make venv)" >&2; exit 1; }
	$(BIN)/python -m pip install --no-build-isolation --no-deps turbodiffusion

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores 1 --resources gpu=1

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" pytest -q

lint: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" snakemake --lint

clean-demo:
	rm -rf results/demo .snakemake
