# usad_bench — common tasks. Every target uses the project's virtual environment (.venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/usad-bench
SHARED ?= ../shared/datasets
DEVICE ?= auto

.PHONY: install test lint format smoke demo bench-features bench-classifiers data table1 table_cls table2 ablation ultraad-paper clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)  ## install the package with test and lint tools
	$(PY) -m pip install -e ".[dev]"

test:  ## the whole test suite (tiny random CLIP, synthetic data; ~10 min on 2 cores)
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format:
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

smoke: install  ## install, then run the built-in demo end to end (synthetic data, tiny random CLIP)
	$(CLI) demo --out runs/demo

demo: smoke

bench-features:  ## feature-extraction throughput: cache path (cold, warm) vs bare encode_image
	$(PY) benchmarks/bench_features.py --out results/bench/features.json --device $(DEVICE)

bench-classifiers:  ## seconds per fit+eval run of each few-shot classifier on cached features (shots 4/8/16 x seeds 0/1/2)
	$(PY) benchmarks/bench_classifiers.py --out results/bench/classifiers.json

MANIFESTS := data/bus_uclm/manifest.csv data/busi/manifest.csv data/bus_bra/manifest.csv

data: $(MANIFESTS)  ## manifests for the three public releases (point SHARED at the full releases on your machine)

# File targets: a manifest that exists is not re-made, so `make table1` after `make data SHARED=/full/releases`
# keeps those manifests. Delete data/<name>/ (or run `make -B data SHARED=...`) to prepare again.
data/%/manifest.csv:
	$(CLI) data prepare $* $(SHARED)/$* data/$*

# Paper tables: real ViT-L-14-336 weights, a GPU and internet (or a filled weights cache) needed.
table1: $(MANIFESTS)
	$(CLI) sweep experiments/table1.yaml --device $(DEVICE)
	$(CLI) table results/runs/table1 --which table1 --out results/tables

table_cls: $(MANIFESTS)
	$(CLI) sweep experiments/table_cls.yaml --device $(DEVICE)
	$(CLI) table results/runs/table_cls --which table_cls --out results/tables

table2: $(MANIFESTS)  ## shares table1's runs (same grid): only what is missing is fitted
	$(CLI) sweep experiments/table2.yaml --device $(DEVICE)
	$(CLI) table results/runs/table1 --which table2 --out results/tables

ablation: $(MANIFESTS)
	$(CLI) sweep experiments/ablation.yaml --device $(DEVICE)
	$(CLI) table results/runs/ablation --which ablation --out results/tables

ultraad-paper: $(MANIFESTS)
	$(CLI) sweep experiments/ultraad_paper.yaml --device $(DEVICE)
	$(CLI) table results/runs/ultraad_paper --which table1 --out results/tables/ultraad_paper
	$(CLI) table results/runs/ultraad_paper --which table_cls --out results/tables/ultraad_paper
	$(CLI) table results/runs/ultraad_paper --which table2 --out results/tables/ultraad_paper

clean:
	rm -rf runs .usad_cache .pytest_cache .ruff_cache
