# Two commands for a fresh machine with Python 3.11: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean pure

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=77"

$(STAMP): pyproject.toml setup.py | $(BIN)/python
	# Interpreted here; the rule below compiles, once, with the venv's mypyc.
	BERTH_PURE_PYTHON=1 $(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The gateway's per-request path compiled with mypyc (setup.py lists the
# modules). Rebuilt whenever one of them changes, so what runs is never older
# than its source; BERTH_PURE_PYTHON=1 runs it interpreted instead.
COMPILED := $(shell sed -n 's|^    "\(src/berth/gateway/.*\.py\)",$$|\1|p' setup.py)
BUILT    := src/berth/gateway/compiled.json

$(BUILT): $(COMPILED) setup.py $(STAMP)
	$(BIN)/python setup.py --quiet build_ext --inplace

pure:
	rm -rf build src/*.so src/berth/gateway/*.so $(BUILT)

ifeq ($(BERTH_PURE_PYTHON),1)
GATEWAY := pure $(STAMP)
else
GATEWAY := $(BUILT)
endif

run: $(GATEWAY)
	$(BIN)/berth up

lint: $(STAMP)
	$(BIN)/ruff check setup.py src tests bench
	$(BIN)/ruff format --check setup.py src tests bench
	$(BIN)/mypy

test: $(GATEWAY) lint
	$(BIN)/pytest -q

# `make bench` runs every benchmark; `make bench-store` (gateway,
# gateway_control, scheduler, imaging) runs one. They install what they
# compare against (wrk, nginx, thumbor) on first use.
BENCHES := store gateway gateway_control scheduler imaging

bench: $(addprefix bench-,$(BENCHES))

bench-%: $(GATEWAY)
	$(BIN)/python bench/$*.py

clean:
	rm -rf $(VENV) berth-data .pytest_cache .mypy_cache .ruff_cache build src/*.so src/berth/gateway/*.so $(BUILT)
