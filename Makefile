# Two commands matter: `make demo` (the main job on the bundled default) and `make test`.
# Each creates .venv and installs what it needs: torch first (a CPU build), then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.secfedtl-installed

.PHONY: venv demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,data]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo  # the demo ledger is a throwaway; real jobs never overwrite a ledger
	$(VENV)/bin/secfedtl demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/secfedtl bench secagg --clients 100 --params 1000000 --neighbors 11 --threshold 6 --dropout 0.05

clean:
	rm -rf $(VENV) runs build *.egg-info
