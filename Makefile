# esbridge — the two commands: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install provision test lint demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Java, Maven and the PostgreSQL server (apt-get, when root), the Kafka jars (Maven Central).
provision: install
	$(PY) -m esbridge.testing.provision

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check esbridge connectors
	$(PY) -m mypy

# Second pass: the testcontainers backend (podman's Docker API here, images built from local files).
CONTAINER_TESTS ?= tests/containers examples/user_test_suite

test: provision lint
	$(PY) -m pytest $(PYTEST_ARGS) $(addprefix --ignore=,$(CONTAINER_TESTS))
	ESBRIDGE_TEST_BACKEND=containers $(PY) -m pytest $(CONTAINER_TESTS)

demo: provision
	$(VENV)/bin/esbridge demo $(DEMO_ARGS)

bench: provision
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
