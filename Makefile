# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mirrorla-installed

.PHONY: test demo lint bench-cpu model-table study clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	# animal-mnist ships real data; its declared dependencies pull in tensorflow, which we never import.
	$(PY) -m pip install --no-deps animal-mnist==0.4
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m mirrorla demo --out runs/demo

model-table: $(STAMP)
	$(PY) -m mirrorla info --table --readme README.md

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

bench-cpu: $(STAMP)
	bash benchmarks/run_cpu.sh $(PY)

# The accuracy study: STUDY names a file in benchmarks/study/ (default mirror_study, step 1: about 2 hours on
# 2 cores, JOBS=2 runs two single-threaded runs at a time; mirror_choices is step 2, about 2.3 hours);
# `make study QUICK=1` runs the study's quick seeds. Runs (with their checkpoints) stay in runs/study (step 1) or
# runs/<STUDY>; the report is copied to benchmarks/results/accuracy/ (step 1) or benchmarks/results/accuracy/<STUDY>/.
JOBS ?= 2
STUDY ?= mirror_study
STUDY_RUNS := $(if $(filter mirror_study,$(STUDY)),runs/study,runs/$(STUDY))
STUDY_REPORT := benchmarks/results/accuracy$(if $(filter mirror_study,$(STUDY)),,/$(STUDY))
study: $(STAMP)
	$(PY) -m mirrorla compare --variants benchmarks/study/$(STUDY).json --out $(STUDY_RUNS) --analyze \
	    $(if $(QUICK),--quick) --no-progress --jobs $(JOBS)
	mkdir -p $(STUDY_REPORT)
	cp $(STUDY_RUNS)/study.json $(STUDY_RUNS)/results.json $(STUDY_RUNS)/results.md $(STUDY_RUNS)/results.png \
	    $(STUDY_REPORT)/

clean:
	rm -rf $(VENV) runs .pytest_cache
