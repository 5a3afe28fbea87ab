# keylease — the two commands a fresh machine needs:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test check lint pytest proto proto-check wheelhouse vm-image vm-test

setup:
	@bash scripts/setup.sh

## Show the main job end to end on embedded defaults (swtpm, broker on SQLite, skopeo).
demo: setup
	$(PY) -m demo

## Install what is missing (including the dependency wheelhouse and the VM test's cached guest
## image, the only steps that download: Debian packages and wheels), then lint, type-check and run
## the whole test suite offline.
test: setup wheelhouse vm-image check pytest

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

## Issue 5's acceptance test: a Debian 12 VM (qemu, OVMF, swtpm) with the agent as its systemd unit.
## The guest image is cached in /var/cache/keylease-vm (KEYLEASE_VM_CACHE); logs in VM_WORK.
VM_WORK ?= /tmp/keylease-vm-run
## Wheels of every dependency of keylease[agent,broker] (cached by the pinned versions), for the
## offline install tests and the VM guest.
wheelhouse: setup
	$(PY) -m harness.wheelhouse

vm-image: setup
	$(PY) -m tests.system.vm.image

vm-test: setup
	rm -rf $(VM_WORK) && $(PY) -m tests.system.vm.scenario $(VM_WORK)
