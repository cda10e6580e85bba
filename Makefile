# Two entry points for a fresh machine: `make test` and `make demo`.
# Both create (or reuse) a virtual environment in .venv. The venv sees the system site-packages so
# that a GPU machine's own torch is used; torch is installed only when none is importable, and then
# pinned to the CPU build that a CPU-only machine has locally (any looser pin pulls CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.fsdpkit-installed

.PHONY: install test lint demo bench clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null \
		&& echo "using installed torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/fsdpkit models
	$(VENV)/bin/fsdpkit plan --model regnet10b --batch 16

bench: $(STAMP)
	$(PY) bench/bench_models.py
	$(PY) bench/bench_planner.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .benchmarks
