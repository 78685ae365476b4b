# The two commands of the README: `make run` (server with embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test processes (pytest-xdist): whole files per process, so module fixtures start once.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed-$(shell cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Your own config when you made one (git ignores it; see the README tour), else the shipped one.
CONFIG ?= $(if $(wildcard etc/local.ini),etc/local.ini,etc/mailgw.ini)

run: $(STAMP)
	$(VENV)/bin/twistd --pidfile= -n mailgw --config $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	rm -f .coverage .coverage.*
	$(PY) -m pytest --cov --cov-report= --durations=15 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	$(PY) -m coverage combine -q || true
	$(PY) -m coverage report

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/smtp_inbound.py

clean:
	rm -rf $(VENV) var .coverage .coverage.* .pytest_cache .mypy_cache
