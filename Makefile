# The two commands of the README. Both create .venv on first use (Python 3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EVENTS ?= 20000

.PHONY: run test lint clean

$(BIN)/edgepipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# End-to-end sample on embedded defaults: SQLite + local archive dir under ./data/.
run: $(BIN)/edgepipe
	$(BIN)/edgepipe init
	$(BIN)/edgepipe sample --events $(EVENTS) > data/sample.ndjson
	$(BIN)/edgepipe ingest data/sample.ndjson
	$(BIN)/edgepipe --log-level WARNING consume --until-empty
	$(BIN)/edgepipe paths top --hours 24 --limit 15

test: $(BIN)/edgepipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

lint: $(BIN)/edgepipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
