# Two commands matter: `make demo` (the main job on the bundled default) and `make test`.
# Each creates .venv and installs what it needs: torch first (a CPU build), then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.secfedtl-installed
FLOWER_STAMP := $(VENV)/.secfedtl-flower-installed

.PHONY: venv flower-venv demo test test-flower bench bench-secagg-flower bench-flower clean radiology-venv radiology

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,data,fashion]'
	touch $(STAMP)

# The Flower extras (flwr 1.41, Ray for its simulation engine) go into the same venv, after the core.
$(FLOWER_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[flower-sim]'
	touch $(FLOWER_STAMP)

venv: $(STAMP)

# .venv plus the Flower extras: `secfedtl flower local|simulate`, `secfedtl node` (docs/deploy-flower.md).
flower-venv: $(FLOWER_STAMP)

demo: $(STAMP)
	rm -rf runs/demo  # the demo ledger is a throwaway; real jobs never overwrite a ledger
	$(VENV)/bin/secfedtl demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

# Real Flower processes on 127.0.0.1 (a few minutes); CI runs it after `make test`.
test-flower: $(FLOWER_STAMP)
	$(PY) -m pytest -q -m 'not slow' tests/runtime/test_flower_pool.py
	$(PY) -m pytest -q -m 'flower and not slow' tests


# k and t by SecAggConfig.recommended for 100 clients (no --neighbours / --threshold given).
bench: $(STAMP)
	$(VENV)/bin/secfedtl bench secagg --clients 100 --params 1000000 --dropout 0.05 --authenticated

# The same, with Flower 1.41's SecAgg+ measured in the same process on the same inputs (a few minutes).
bench-secagg-flower: $(FLOWER_STAMP)
	$(VENV)/bin/secfedtl bench secagg --clients 100 --params 1000000 --dropout 0.05 --authenticated --compare-flower

bench-flower: $(FLOWER_STAMP)
	$(VENV)/bin/secfedtl bench flower --rounds 3 --simulation

# examples/radiology_reports: its own venv, so `make test` keeps CI's set of packages.
# torch is pinned while the extras install (transformers must not replace the CPU build);
# torchxrayvision only carries the report archive: --no-deps keeps its stack out.
RADIOLOGY_VENV ?= .venv-radiology
RADIOLOGY_STAMP := $(RADIOLOGY_VENV)/.secfedtl-installed

$(RADIOLOGY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(RADIOLOGY_VENV)
	$(RADIOLOGY_VENV)/bin/python -m pip install -q --upgrade pip
	$(RADIOLOGY_VENV)/bin/python -m pip install -q torch==2.13.0
	$(RADIOLOGY_VENV)/bin/python -m pip install -q -c examples/radiology_reports/constraints.txt -e '.[dev,data,radiology]'
	$(RADIOLOGY_VENV)/bin/python -m pip install -q --no-deps torchxrayvision==1.5.7
	touch $(RADIOLOGY_STAMP)

radiology-venv: $(RADIOLOGY_STAMP)

radiology: $(RADIOLOGY_STAMP)
	rm -rf runs/radiology  # a throwaway ledger, as for the demo
	$(RADIOLOGY_VENV)/bin/python examples/radiology_reports/run.py --out runs/radiology

clean:
	rm -rf $(VENV) $(RADIOLOGY_VENV) runs build *.egg-info
