# Two entry points, each doing all of its own set-up (idempotently):
#   make demo   run the built-in demo batch (tiny models on the CPU, or your GPU)
#   make test   run the test suite
PYTHON ?= python3
VENV ?= .venv
# On a CPU machine this is a CPU build; on a GPU machine PyPI's default build brings CUDA.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" snakemake --cores 1 --resources gpu=1

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" pytest -q

lint: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" snakemake --lint

clean-demo:
	rm -rf results/demo .snakemake
