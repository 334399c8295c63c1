# The two commands a new user needs:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test unit integration soak bench stack-up stack-down stack-status stack-reset lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## Python dependencies into .venv

demo: install  ## stack up, topics, reference data, 4 stages, bundled real NEM12 files -> invoices
	$(BIN)/pipeline demo

test: install  ## every test; integration tests start the local Kafka + Postgres if not running
	$(BIN)/python -m pytest -q

soak: install  ## 100 SIGKILLs, a broker and a Postgres restart over the bundled data; one-line verdict
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -q tests/integration

stack-up: install
	$(BIN)/pipeline stack up

stack-down:
	@if [ -x $(BIN)/pipeline ]; then $(BIN)/pipeline stack down; fi

stack-status: install
	$(BIN)/pipeline stack status

stack-reset: install
	$(BIN)/pipeline stack reset

lint: install
	$(BIN)/ruff check .

clean: stack-down
	rm -rf $(VENV) .stack .pytest_cache .ruff_cache
