# `make run`: set up, fetch the default model, start a local 3-node cluster and answer a prompt.
# `make test`: set up, fetch the default model, run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zpipe-installed
PROMPT ?= What is the capital of France? Answer in two sentences.
# torch for the venv: the CPU build where no NVIDIA GPU is seen (a plain `pip install torch`
# takes the CUDA build, several GB); on GPU machines pip's choice. `make setup TORCH=...` picks
# another (empty: leave it to pip).
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)

.PHONY: run test setup model lint bench clean

run: setup model
	$(BIN)/zpipe up configs/local.yaml --chat --prompt "$(PROMPT)" --max-new-tokens 64

test: setup model
	$(BIN)/python -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q '$(TORCH)')
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

model: setup
	$(BIN)/zpipe model fetch smollm2

lint: setup
	$(BIN)/ruff check .

bench: setup model
	$(BIN)/python -m bench compare --stages 3 --concurrency 16

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
