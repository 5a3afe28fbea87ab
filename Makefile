# keylease — the two commands a fresh machine needs:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test check lint pytest proto proto-check

setup:
	@bash scripts/setup.sh

## Show the main job end to end on embedded defaults (swtpm, broker on SQLite, skopeo).
demo: setup
	$(PY) -m demo

## Install what is missing, then lint, type-check and run the whole test suite.
test: setup check pytest

check: lint proto-check

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

pytest:
	$(VENV)/bin/pytest -q

proto:
	PATH=$(VENV)/bin:$$PATH scripts/gen_proto.sh

proto-check:
	PATH=$(VENV)/bin:$$PATH scripts/gen_proto.sh --check
