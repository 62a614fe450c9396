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

run: $(STAMP)
	$(RUN) model=lenet5 tau=0.15 epochs=5 data.subset=20000

# The paper's MNIST tables from real runs (finished runs are skipped, interrupted ones resume), then
# results/tables/*.csv|md and results/plots/*.png. QUICK=1: a few epochs on a data subset, into
# runs_quick/ and results/quick/, to try the pipeline in minutes on a CPU.
ifeq ($(QUICK),1)
SWEEP_ARGS := out_dir=runs_quick data.subset=5000 progress=false
reproduce-tables: $(STAMP)
	$(RUN) -m experiment=lenet5_mnist seed=0,1 epochs=2 $(SWEEP_ARGS)
	$(RUN) -m experiment=lenet5_mnist method=dense tau=0 seed=0,1 epochs=2 $(SWEEP_ARGS)
	$(RUN) -m experiment=fc_mnist tau=0.09,0.17 epochs=1 finetune.epochs=1 $(SWEEP_ARGS)
	$(RUN) -m experiment=fc_mnist method=dense tau=0 epochs=1 $(SWEEP_ARGS)
	$(RUN) -m experiment=dlrt_vs_uv seed=0,1 epochs=2 $(SWEEP_ARGS)
	$(VENV)/bin/dlrt-tables --runs runs_quick --out results/quick
else
reproduce-tables: $(STAMP)
	$(RUN) -m experiment=lenet5_mnist progress=false
	$(RUN) -m experiment=lenet5_mnist method=dense tau=0 epochs=10 progress=false
	$(RUN) -m experiment=fc_mnist progress=false
	$(RUN) -m experiment=fc_mnist method=dense tau=0 progress=false
	$(RUN) -m experiment=dlrt_vs_uv progress=false
	$(VENV)/bin/dlrt-tables --runs runs --out results
endif

bench: $(STAMP)
	$(VENV)/bin/dlrt-bench

clean:
	rm -rf $(VENV) build *.egg-info
