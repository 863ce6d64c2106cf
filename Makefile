# Two commands are all a newcomer needs: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test lint typecheck bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,text,dev]"
	# torchattacks: a test reference and the engine of the AutoAttack preset; its pinned `requests` would conflict, so no deps.
	$(PY) -m pip install -q --no-deps torchattacks
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_robust.demo --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_robust tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) lint typecheck
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks --update

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache .mypy_cache
