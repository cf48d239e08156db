# The two commands of the README. Both create .venv on first use (Python 3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DAYS ?= 2
RATE ?= 1

.PHONY: run test lint clean

$(BIN)/edgepipe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,analytics]'
	touch $@

# End to end on embedded defaults (SQLite + local archive dir under ./data/): a simulated
# deployment of DAYS days at RATE events/s (traffic, consumer, every cron job), then the top
# paths. --force: a second `make run` adds to the first (`make clean` starts again).
run: $(BIN)/edgepipe
	$(BIN)/edgepipe init
	$(BIN)/edgepipe --log-level WARNING demo --days $(DAYS) --rate $(RATE) --force
	$(BIN)/edgepipe paths top --hours 24 --limit 15

test: $(BIN)/edgepipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	bash infra/ensure-services.sh
	bash infra/ensure-tools.sh
	$(BIN)/python -m pytest -q

lint: $(BIN)/edgepipe
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache
