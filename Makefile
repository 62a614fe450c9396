# Every target sets itself up: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

RUN := $(VENV)/bin/dlrt-run
.PHONY: setup run test reproduce-tables bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# One thread: beside another busy process a second thread makes LAPACK stall (tests/conftest.py says more).
run: $(STAMP)
	$(RUN) model=lenet5 tau=0.15 epochs=5 data.subset=20000 threads=1

# The paper's MNIST tables from real runs, then results/tables/*.csv|md and results/plots/*.png. RUNS (default
# results/runs, the committed run records) is where run folders go: finished runs are skipped and interrupted ones
# resume, so the default completes what is missing; RUNS=runs reruns everything in a folder of your own.
# QUICK=1: a few epochs on a data subset, into runs_quick/ and results/quick/, to try the pipeline in minutes.
RUNS ?= results/runs
TABLES := $(VENV)/bin/dlrt-tables --archive results/archive/2026-11-27
ifeq ($(QUICK),1)
SWEEP_ARGS := out_dir=runs_quick data.subset=5000 progress=false threads=1
reproduce-tables: $(STAMP)
	$(RUN) -m experiment=lenet5_mnist seed=0,1 epochs=2 $(SWEEP_ARGS)
	$(RUN) -m experiment=lenet5_mnist method=dense tau=0 seed=0,1 epochs=2 $(SWEEP_ARGS)
	$(RUN) -m experiment=fc_mnist tau=0.09,0.17 epochs=1 finetune.epochs=1 $(SWEEP_ARGS)
	$(RUN) -m experiment=fc_mnist method=dense tau=0 epochs=1 $(SWEEP_ARGS)
	$(RUN) -m experiment=dlrt_vs_uv seed=0,1 epochs=2 $(SWEEP_ARGS)
	$(RUN) -m experiment=dlrt_vs_uv_authors seed=0 epochs=2 $(SWEEP_ARGS)
	$(TABLES) --runs runs_quick --out results/quick
else
SWEEP_ARGS := out_dir=$(RUNS) progress=false threads=1
reproduce-tables: $(STAMP)
	$(RUN) -m experiment=lenet5_mnist $(SWEEP_ARGS)
	$(RUN) -m experiment=lenet5_mnist method=dense tau=0 epochs=10 $(SWEEP_ARGS)
	$(RUN) -m experiment=lenet5_mnist model.init=svd $(SWEEP_ARGS)
	$(RUN) -m experiment=dlrt_vs_uv_authors $(SWEEP_ARGS)
	$(RUN) -m experiment=dlrt_vs_uv $(SWEEP_ARGS)
	$(RUN) -m experiment=fc_mnist $(SWEEP_ARGS)
	$(RUN) -m experiment=fc_mnist method=dense tau=0 $(SWEEP_ARGS)
	$(TABLES) --runs $(RUNS) --out results
endif

bench: $(STAMP)
	$(VENV)/bin/dlrt-bench

clean:
	rm -rf $(VENV) build *.egg-info
