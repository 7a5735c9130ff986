# Set-up and the main jobs. Everything lives in .venv; torch 2.13.0 (CPU) is installed before the project so
# that no requirement can pull a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= reports/default

.PHONY: install investigate test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

investigate: install
	$(VENV)/bin/memloc investigate --out $(OUT)

test: install
	OMP_NUM_THREADS=1 RAY_AUTH_MODE=disabled $(PY) -m pytest -q

bench: install
	$(PY) benchmarks/train_default.py
	$(PY) benchmarks/capture.py
	$(PY) benchmarks/ablate.py
	$(PY) benchmarks/probes.py
	$(PY) benchmarks/scores.py
	$(PY) benchmarks/edit.py
	$(PY) benchmarks/unlearn.py
	$(PY) benchmarks/device.py
	$(PY) benchmarks/memorized.py
	$(PY) benchmarks/lm_testbed.py

clean:
	rm -rf $(VENV) reports runs .pytest_cache
