# `make run`: set up, fetch the default model, start a local 3-node cluster and answer a prompt.
# `make test`: set up, fetch the default model, run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zpipe-installed
PROMPT ?= What is the capital of France? Answer in two sentences.

.PHONY: run test setup model lint bench clean

run: setup model
	$(BIN)/zpipe up configs/local.yaml --chat --prompt "$(PROMPT)" --max-new-tokens 64

test: setup model
	$(BIN)/python -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

model: setup
	$(BIN)/zpipe model fetch smollm2

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
