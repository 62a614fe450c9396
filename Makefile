# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

RUN := $(VENV)/bin/dlrt-run
.PHONY: setup run test test-fast reproduce-tables bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# `make test` is the whole suite (CI runs it); `make test-fast` the unit tests only, under 2 minutes: the end-to-end
# tests (marked slow in tests/conftest.py: processes, training runs, the wheel, the Hydra app) are left out.
test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# One thread: beside another busy process a second thread makes LAPACK stall (tests/conftest.py says more).
run: $(STAMP)
	$(RUN) model=lenet5 tau=0.15 epochs=5 data.subset=20000 threads=1

# The paper's MNIST tables from real runs, then results/tables/*.csv|md and results/plots/*.png. The runs are those
# of dlrt/experiments/protocols.py (SWEEPS): `dlrt-tables --missing` lists the ones RUNS (default results/runs, the
# committed run records) does not hold finished, interrupted ones included (dlrt-run resumes them), into
# logs/missing_runs.txt; scripts/parallel_runs.sh runs them JOBS (default 2) at a time, one thread each, and with
# DEADLINE=<seconds> starts none after that many seconds and stops those still running then (run the target again
# to resume them). QUICK=1: one seed per row, 1 epoch (+1 fine-tuning) on 5000 images, into runs_quick/ and
# results/quick/, to try the pipeline.
JOBS ?= 2
DEADLINE ?=
QUEUE := logs/missing_runs.txt
TABLES := $(VENV)/bin/dlrt-tables
ifeq ($(QUICK),1)
RUNS := runs_quick
OUT := results/quick
MISSING := --seeds 1 --override epochs=1 finetune.epochs=1 data.subset=5000
ARCHIVE :=
else
RUNS ?= results/runs
OUT := results
MISSING :=
ARCHIVE := --archive results/archive/2026-11-27
endif
reproduce-tables: $(STAMP)
	mkdir -p logs
	$(TABLES) --runs $(RUNS) --missing $(MISSING) > $(QUEUE)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/parallel_runs.sh $(QUEUE) $(JOBS) $(DEADLINE)
	$(TABLES) --runs $(RUNS) --out $(OUT) $(ARCHIVE)

bench: $(STAMP)
	$(VENV)/bin/dlrt-bench

clean:
	rm -rf $(VENV) build *.egg-info
