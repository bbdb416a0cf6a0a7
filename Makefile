# esbridge — the two commands: `make demo` (the main job) and `make test`.
# The newest CPython found (3.13, then 3.12, then python3): esbridge supports 3.11+, and
# 3.13 runs a consumer's batches ~10 % faster than 3.11 (bench/consume.py, docs/consumer.md).
# Pyenv's versions count even when pyenv has not put them on PATH. make PYTHON=... to choose.
_runs = $(shell $(1) -c "" >/dev/null 2>&1 && echo $(1))
_newest = $(firstword $(foreach v,3.13 3.12,$(foreach p,python$(v) \
	$(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/$(v).*/bin/python$(v)))),$(call _runs,$(p)))))
ifeq ($(origin PYTHON),undefined)
PYTHON := $(or $(_newest),python3)
endif
# The oldest CPython supported, for a second pass of the quick tests (when found).
ifeq ($(origin OLDEST_PYTHON),undefined)
OLDEST_PYTHON := $(firstword $(foreach p,python3.11 \
	$(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.11.*/bin/python3.11))),$(call _runs,$(p))))
endif
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install provision test test-oldest lint demo bench clean

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
	$(PY) -m ruff format --check esbridge esbridge_connectors tests bench examples
	$(PY) -m mypy

# Second pass: the testcontainers backend (podman's Docker API here, images built from local files).
CONTAINER_TESTS ?= tests/containers examples/user_test_suite

test: provision lint
	$(PY) -m pytest $(PYTEST_ARGS) $(addprefix --ignore=,$(CONTAINER_TESTS))
	ESBRIDGE_TEST_BACKEND=containers $(PY) -m pytest $(CONTAINER_TESTS)
	$(MAKE) test-oldest

# The quick tests (tests/unit) on the oldest supported
# CPython too, in .venv-oldest: the integration suite runs on $(PYTHON) only.
test-oldest:
ifneq ($(OLDEST_PYTHON),)
	@if [ "$$($(OLDEST_PYTHON) -c 'import sys; print(sys.version_info[:2])')" = \
	     "$$($(PY) -c 'import sys; print(sys.version_info[:2])')" ]; then \
	  echo "test-oldest: $(PY) is the oldest CPython already"; else \
	  $(MAKE) install VENV=.venv-oldest PYTHON=$(OLDEST_PYTHON) && \
	  .venv-oldest/bin/python -m pytest -q tests/unit; fi
else
	@echo "test-oldest: no python3.11 here; skipped"
endif

demo: provision
	$(VENV)/bin/esbridge demo $(DEMO_ARGS)

bench: provision
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .venv-oldest .mypy_cache .ruff_cache .pytest_cache
