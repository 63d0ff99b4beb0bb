# recomp-eval: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Pins live here and only here: the CPU build of torch is installed first so that nothing
# pulls a CUDA build; lmms-eval (scoring oracle) goes in without its dependencies.
TORCH_PIN := torch==2.13.0
LMMS_EVAL_PIN := lmms-eval==0.7.3
# filelock 4.2.x: lmms-eval 0.7.3's simple_evaluate needs filelock._api (gone in 4.3);
# eva-decord: the `decord` module its llava_hf wrapper imports (scripts/bench_peer.py runs it)
LMMS_RUNTIME := loguru sacrebleu evaluate pytz tenacity pytablewriter filelock==4.2.12 eva-decord==0.6.1
# scaling out: `accelerate launch` and device_map=auto, Hydra's SLURM launcher (docs/scaling.md)
SCALE_PINS := accelerate==1.15.0 submitit==1.5.4 hydra-submitit-launcher==1.2.0
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: help eval eval-dp eval-lmms demo-docs install lint format test test-all test-gpu bench bench-gpu tables sweep fixtures clean

help: ## list the targets
	@grep -E '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# The demo writes only under $(DEMO_ROOT) (git-ignored): `make eval` leaves the working tree clean.
# `make demo-docs` copies its tables into docs/demo/ and the README (what the README shows).
DEMO_ROOT ?= results/demo
DEMO_BENCHMARKS ?= gqa,vqav2,textvqa,pope,mme
eval: $(VENV)/.installed ## offline demo: every method on SynthVQA with synth-llava (CPU, minutes)
	$(PY) scripts/make_synth.py --out $(DEMO_ROOT)/synth --skip-existing
	$(VENV)/bin/recomp-eval -m experiment=synth_demo benchmark=$(DEMO_BENCHMARKS) paths.root=$(DEMO_ROOT) $(ARGS)
	$(VENV)/bin/recomp-eval-tables --root $(DEMO_ROOT)/raw --experiment synth_demo --out $(DEMO_ROOT)/tables --print-slices slices_gqa_size slices_gqa_near_large targets_gqa

demo-docs: $(VENV)/.installed ## after `make eval`: copy the demo tables into docs/demo/ and the README
	$(PY) scripts/update_demo_docs.py --tables $(DEMO_ROOT)/tables --docs docs/demo --readme README.md

# Two stamps: what running evaluations needs, and on top of it what tests and lint need (pytest,
# ruff, lmms-eval as the scoring oracle), so that `make eval` on a fresh clone installs less.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -c <(echo $(TORCH_PIN)) -e .
	$(PIP) install -q -c <(echo $(TORCH_PIN)) $(SCALE_PINS)
	@$(PY) -c "import importlib.util, sys; sys.exit('torchvision must not be installed (breaks transformers on the CPU torch)' if importlib.util.find_spec('torchvision') else 0)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c <(echo $(TORCH_PIN)) -e '.[dev]'
	$(PIP) install -q --no-deps $(LMMS_EVAL_PIN)
	$(PIP) install -q -c <(echo $(TORCH_PIN)) $(LMMS_RUNTIME)
	@$(PY) -c "import importlib.util, sys; sys.exit('torchvision must not be installed (breaks transformers on the CPU torch)' if importlib.util.find_spec('torchvision') else 0)"
	touch $@

install: $(VENV)/.installed-dev ## create .venv and install pinned dependencies (runtime + dev)

lint: $(VENV)/.installed-dev ## ruff lint + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed-dev ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(VENV)/.installed-dev ## run the test suite (installs first when needed)
	$(PY) -m pytest -q -m "not slow and not gpu and not hub" $(ARGS)

test-all: $(VENV)/.installed-dev ## run all tests including slow ones
	$(PY) -m pytest -q -m "not gpu and not hub" $(ARGS)

test-gpu: $(VENV)/.installed-dev ## run the GPU smoke tests (needs CUDA)
	$(PY) -m pytest -q -m gpu $(ARGS)

bench: $(VENV)/.installed ## compression benchmark (JSON + markdown under results/bench)
	$(PY) scripts/bench_compression.py $(ARGS)

bench-gpu: $(VENV)/.installed-dev ## every GPU figure in one run (one H100/H200, < 10 min), then the docs table
	$(PY) scripts/bench_gpu.py $(ARGS)
	$(PY) scripts/update_bench_docs.py

# Data-parallel: NPROC torchrun processes (one device each, cuda:LOCAL_RANK on GPUs). Default: the
# demo into $(DP_ROOT), one CPU thread per process; ARGS adds or overrides Hydra settings.
NPROC ?= 2
DP_THREADS ?= 1
DP_ROOT ?= results/demo-dp
eval-dp: $(VENV)/.installed ## the demo with NPROC processes (torchrun), e.g. make eval-dp NPROC=2
	$(PY) scripts/make_synth.py --out $(DP_ROOT)/synth --skip-existing
	OMP_NUM_THREADS=$(DP_THREADS) $(VENV)/bin/torchrun --nproc-per-node $(NPROC) -m recomp_eval -m experiment=synth_demo benchmark=$(DEMO_BENCHMARKS) paths.root=$(DP_ROOT) runner.torch_threads=$(DP_THREADS) $(ARGS)
	$(VENV)/bin/recomp-eval-tables --root $(DP_ROOT)/raw --experiment synth_demo --out $(DP_ROOT)/tables

# lmms-eval itself, with our model class (--model recomp_llava) on its own task YAMLs over the
# local SynthVQA parquet (docs/lmms.md); MODEL_ARGS picks the method, ARGS adds lmms-eval flags.
LMMS_TASKS ?= local_pope,local_mme,local_gqa
MODEL_ARGS ?= method=recomp,variant=paper,retention=0.1
eval-lmms: $(VENV)/.installed-dev ## lmms-eval + our plugin on local tasks, e.g. make eval-lmms MODEL_ARGS=method=fastv
	$(PY) scripts/make_synth.py --out $(DEMO_ROOT)/synth --skip-existing
	$(PY) -m recomp_eval.lmms_plugin.tasks --data $(DEMO_ROOT)/synth --out $(DEMO_ROOT)/lmms_tasks
	$(PY) -m lmms_eval --model recomp_llava --model_args pretrained=models/synth-llava,device=cpu,requests_file=$(DEMO_ROOT)/lmms/requests.jsonl,$(MODEL_ARGS) --tasks $(LMMS_TASKS) --include_path $(DEMO_ROOT)/lmms_tasks --batch_size 8 --output_path $(DEMO_ROOT)/lmms $(ARGS)

eval-%: $(VENV)/.installed ## evaluate one benchmark, e.g. make eval-gqa ARGS="method=recomp retention=0.1"
	$(VENV)/bin/recomp-eval benchmark=$* $(ARGS)

SWEEP_METHODS ?= recomp,fastervlm,visionzip,pool,random
SWEEP_RATIOS ?= 0.05,0.1,0.2,0.5
sweep: $(VENV)/.installed ## multirun: methods x retention ratios (SWEEP_METHODS, SWEEP_RATIOS, ARGS)
	$(VENV)/bin/recomp-eval -m method=$(SWEEP_METHODS) retention=$(SWEEP_RATIOS) $(ARGS)

TABLES_ROOT ?= results/raw
TABLES_OUT ?= results/tables
tables: $(VENV)/.installed ## merge finished shards, then tables and plots from TABLES_ROOT (default results/raw)
	$(VENV)/bin/recomp-eval-merge --root $(TABLES_ROOT)
	$(VENV)/bin/recomp-eval-tables --root $(TABLES_ROOT) --out $(TABLES_OUT) $(ARGS)

FIXTURES ?= results/fixtures
fixtures: $(VENV)/.installed-dev ## write tiny hub-schema fixtures of the five benchmarks to $(FIXTURES)
	$(PY) scripts/make_fixtures.py --out $(FIXTURES)

clean: ## remove caches (keeps .venv and results)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
