# vkernel — every target creates or updates .venv itself; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/vkernel/v1/*.proto)

.PHONY: all venv demo test check lint type unit proto proto-check bench image test-containers clean uffd-stress

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m vkclient.demo --spawn-daemon

# The README's test command: lint, types, proto drift and the whole suite but the containers.
test: check

check: lint type proto-check unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/buf lint

type: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -m "not containers" $(PYTEST_ARGS)

proto: $(STAMP)
	$(PY) scripts/gen_protos.py

proto-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

# run_vmtests.sh's uffd-stress runs, against a private daemon started and stopped for them.
uffd-stress: $(STAMP)
	$(PY) -m vkclient.vkctl --spawn-daemon uffd-stress anon 20 16 shmem 20 16

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

image: $(STAMP)
	bash scripts/build_image.sh

test-containers: image
	bash scripts/test_containers.sh

clean:
	rm -rf $(VENV) build dist .build bench/results
