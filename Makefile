# Two commands for a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/berth up

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/pytest -q

# `make bench` runs every benchmark; `make bench-store` (gateway,
# gateway_control, scheduler, imaging) runs one. They install what they
# compare against (wrk, nginx, thumbor) on first use.
BENCHES := store gateway gateway_control scheduler imaging

bench: $(addprefix bench-,$(BENCHES))

bench-%: $(STAMP)
	$(BIN)/python bench/$*.py

clean:
	rm -rf $(VENV) berth-data .pytest_cache .mypy_cache .ruff_cache
