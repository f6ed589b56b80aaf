# One-command entry points (see README). Every target creates the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SEEDS ?= 0
METHODS ?= erm

.PHONY: setup bench test notebooks lab student check-student clean-runs course

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[notebooks,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

## The main job: generate the procedural city if missing, train ERM (run cache), print the table.
bench: setup
	$(BIN)/dgnb bench --preset quick --methods $(METHODS) --seeds $(SEEDS) --out benchmarks/results/bench_quick.json

## Before a lab: train every run the notebooks need (quick preset; resumable, cached runs are skipped).
course: setup
	$(BIN)/dgnb course prepare --preset quick

## The whole test suite (library, data tools, notebooks executed on the smoke preset).
test: setup
	$(BIN)/python -m pytest -q

## Re-sync the paired notebooks after editing a .py
notebooks: setup
	$(BIN)/jupytext --sync notebooks/*.py

lab: setup
	$(BIN)/jupyter lab notebooks/

## The student edition: student/notebooks/*.ipynb, where the core lines of each method are TODO holes
## (existing student notebooks are kept; FORCE=1 rebuilds them)
student: setup
	$(BIN)/python -m dgnb.student build --src notebooks --out student/notebooks $(if $(FORCE),--force,)

## Grade the functions written in the student edition against the library's reference implementations
check-student: setup
	$(BIN)/python -m dgnb.student check student/notebooks

clean-runs:
	rm -rf runs
