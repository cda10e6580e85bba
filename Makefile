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

# Tests run on every core (pytest-xdist): on 2 cores CI takes ~40% less wall time; every test
# is independent (own tmp dirs, OS-chosen ports) and timeouts are hang guards, not stopwatches.
test: lint
	$(PY) -m pytest -q -n auto --dist worksteal

# The main job on the embedded default: plan the 10B model, pretrain `tiny` with SwAV on 2 CPU
# ranks (planner's checkpointing, FSDP, LARC, sharded checkpoints; sliced at the end), then
# linear evaluation against a random trunk. DEMO_OUT is recreated on every run.
# A 300-step run of a 0.14M-parameter model is not SEER's regime, so three settings differ from
# SEER's: LARC trust 0.01 with peak LR 0.6 per 256 images (SEER's 0.001 moves each tensor
# ~10x too little per step to learn anything in 300 steps), prototypes frozen for 10 steps
# instead of 313, and blur as the only photometric distortion (with SEER's colour jitter the
# tiny model collapses; the synthetic colours already differ between crops of one image).
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 300
demo: $(STAMP)
	$(VENV)/bin/fsdpkit plan --model regnet10b --batch 16
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m seer_train.cli pretrain \
		--model tiny --data synthetic --batch-size 32 --steps $(DEMO_STEPS) \
		--memory-budget 64MiB --save-every 100 --workers 1 --out $(DEMO_OUT) \
		--lr 0.6 --trust 0.01 --freeze-prototypes 10 --photometric blur
	$(VENV)/bin/ckpt inspect $(DEMO_OUT)/sliced
	$(VENV)/bin/seer-train linear-eval --ckpt $(DEMO_OUT)/sliced --data synthetic

bench: $(STAMP)
	$(PY) bench/bench_models.py
	$(PY) bench/bench_planner.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .benchmarks
