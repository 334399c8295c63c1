# The two commands a new user needs:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install monitoring-tools browser-tools demo test unit integration soak bench stack-up stack-up-monitoring stack-down stack-status stack-reset lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## Python dependencies into .venv

monitoring-tools: install  ## Prometheus + promtool (Debian's `prometheus` package; apt-get as root or sudo -n)
	$(BIN)/pipeline stack install-monitoring

browser-tools: install  ## Chromium for the portal's headless test (Debian's `chromium`; apt-get as root or sudo -n)
	$(BIN)/pipeline stack install-browser

demo: install  ## stack up, topics, reference data, 4 stages, bundled real NEM12 files -> invoices
	$(BIN)/pipeline demo

test: install monitoring-tools browser-tools  ## every test; integration tests start the local Kafka + Postgres (+ Prometheus) if not running
	$(BIN)/python -m pytest -q

soak: install  ## 100 SIGKILLs, a broker and a Postgres restart over the bundled data; one-line verdict
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install monitoring-tools browser-tools
	$(BIN)/python -m pytest -q tests/integration

stack-up: install
	$(BIN)/pipeline stack up

stack-up-monitoring: install  ## the stack plus a local Prometheus scraping every process the CLI starts
	$(BIN)/pipeline stack up --with-monitoring

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
