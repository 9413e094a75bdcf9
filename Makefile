# Two entry points do all the setup on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit selftest bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall only when the project's metadata changes (editable install).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vfiomig demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not kselftest"

# The kernel's own iommufd selftests (Debian's linux-source-6.12, fetched with apt-get at
# first use) under `vfiomig run --iommufd-test`: docs/selftests.md.
selftest: $(STAMP)
	$(BIN)/python -m pytest -m kselftest -s tests/test_kselftest_iommufd.py

test: lint typecheck selftest unit

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
