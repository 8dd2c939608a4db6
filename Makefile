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

# The accuracy study (benchmarks/study/mirror_study.json): about 2 hours on 2 cores (JOBS=2 runs
# two single-threaded runs at a time); `make study QUICK=1` runs two seeds.
# Runs (with their checkpoints) stay in runs/study; the report is copied to benchmarks/results/accuracy/.
JOBS ?= 2
study: $(STAMP)
	$(PY) -m mirrorla compare --variants benchmarks/study/mirror_study.json --out runs/study --analyze \
	    $(if $(QUICK),--quick) --no-progress --jobs $(JOBS)
	mkdir -p benchmarks/results/accuracy
	cp runs/study/study.json runs/study/results.json runs/study/results.md runs/study/results.png \
	    benchmarks/results/accuracy/

clean:
	rm -rf $(VENV) runs .pytest_cache
