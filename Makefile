# The two commands the README promises: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mirrorla-installed

.PHONY: test demo lint bench-cpu model-table clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
