# Two commands matter: `make demo` and `make test`. Both install into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint bench clean

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Pin torch first: an unpinned torch would pull GBs of CUDA wheels onto a CPU machine.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,data,eval]'
	touch $(STAMP)

install: $(STAMP)

# One line per stage; each stage's own output goes to runs/demo/logs/. `make demo DEMO_ARGS=--verbose` shows it all.
demo: install
	$(BIN)/python launch/demo.py $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q tests

LINTED := phi_train phi_bench data_tools launch tests setup.py

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/codespell $(LINTED) conf docs README.md

bench: install
	$(BIN)/python launch/bench.py

clean:
	rm -rf data/demo runs outputs multirun wandb
