# usad_bench — common tasks. Every target uses the project's virtual environment (.venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/usad-bench
SHARED ?= ../shared/datasets
DEVICE ?= auto

.PHONY: parity table1-cpu table_cls-cpu table2-cpu figure2 pretrain-tiny install test lint format smoke demo bench-features bench-classifiers bench-grid data table1 table_cls table2 ablation ultraad-paper clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)  ## install the package with test and lint tools
	$(PY) -m pip install -e ".[dev]"

test:  ## the whole test suite (tiny CLIP, synthetic data; a few minutes on 2 cores, < 10 min budget; README)
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

# Parity with the authors' code (not CI: needs their clones). Each script names its repository in a
# `REPO, COMMIT = "owner/name", ...` line; its clone is expected at $(ORIGINALS)/name.
# winclip.py also needs open_clip 2.24.0 (anomalib's pin) unpacked at $(ORIGINALS)/open_clip_2.24.0
# (pip download open_clip_torch==2.24.0 --no-deps, then unzip the wheel there).
ORIGINALS ?= ../originals

parity:  ## run every benchmarks/parity/*.py against $(ORIGINALS)/<repo-name>; writes results/parity/*.json
	@status=0; for script in benchmarks/parity/[a-z]*.py; do \
		name=$$(sed -n 's/^REPO[^"]*"[^/"]*\/\([^"]*\)".*/\1/p' $$script | head -n 1); \
		echo "== $$script ($(ORIGINALS)/$$name)"; \
		$(PY) $$script --original $(ORIGINALS)/$$name || status=1; \
	done; exit $$status

bench-features:  ## feature-extraction throughput: cache path (cold, warm) vs bare encode_image
	$(PY) benchmarks/bench_features.py --out results/bench/features.json --device $(DEVICE)

# One run per method (fit + eval, cold and warm cache) on BUS-UCLM 4 shots -> a BUSI subsample, ViT-B-16 random
# weights, scaled to each grid by `sweep --dry-run` run counts. BENCH_DATA holds prepared bus_uclm/ and busi/.
BENCH_DATA    ?= /tmp/data
BENCH_TEST_N  ?= 40
BENCH_METHODS ?=
bench-grid:  ## seconds per method run and each grid's estimated total (results/bench/grid.json)
	$(PY) benchmarks/bench_grid.py --source $(BENCH_DATA)/bus_uclm/manifest.csv --target $(BENCH_DATA)/busi/manifest.csv \
		--test-n $(BENCH_TEST_N) $(if $(BENCH_METHODS),--methods $(BENCH_METHODS)) --out results/bench/grid.json

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

# The same grids for a machine without a GPU: ViT-B-16 instead of ViT-L-14-336, everything else unchanged,
# runs kept apart under results/runs/*_cpu. CPU_PRETRAINED=none gives random weights (a pipeline check).
CPU_BACKBONE   ?= ViT-B-16
CPU_PRETRAINED ?= openai
CPU_GRID       := --backbone $(CPU_BACKBONE) --pretrained $(CPU_PRETRAINED) --device cpu

table1-cpu: $(MANIFESTS)
	$(CLI) sweep experiments/table1.yaml $(CPU_GRID) --out results/runs/table1_cpu
	$(CLI) table results/runs/table1_cpu --which table1 --out results/tables/cpu

table_cls-cpu: $(MANIFESTS)
	$(CLI) sweep experiments/table_cls.yaml $(CPU_GRID) --out results/runs/table_cls_cpu
	$(CLI) table results/runs/table_cls_cpu --which table_cls --out results/tables/cpu

table2-cpu: $(MANIFESTS)  ## shares table1-cpu's runs
	$(CLI) sweep experiments/table2.yaml $(CPU_GRID) --out results/runs/table1_cpu
	$(CLI) table results/runs/table1_cpu --which table2 --out results/tables/cpu

# Figure 2: N test images (stratified by class, chosen by seed), ground truth, each method's heat map.
FIGURE_RUNS ?= results/runs/table1
FIGURE_N    ?= 6
figure2:
	$(CLI) figure $(FIGURE_RUNS) --which qualitative --images $(FIGURE_N) --device $(DEVICE) --out results/figures

ultraad-paper: $(MANIFESTS)
	$(CLI) sweep experiments/ultraad_paper.yaml --device $(DEVICE)
	$(CLI) table results/runs/ultraad_paper --which table1 --out results/tables/ultraad_paper
	$(CLI) table results/runs/ultraad_paper --which table_cls --out results/tables/ultraad_paper
	$(CLI) table results/runs/ultraad_paper --which table2 --out results/tables/ultraad_paper

# The built-in `--backbone usad-tiny --pretrained synth` weights: Ultrasound-CLIP's semantic-aware objective on a
# captioned synthetic corpus (many scanner styles; never the demo's target style). Deterministic (fixed seed, one
# CPU thread); ~25 min on a 2-core CPU. Writes the package's weights file and its provenance record.
PRETRAIN_DIR ?= runs/pretrain-tiny
WEIGHTS_DIR  := src/usad_bench/resources/weights
pretrain-tiny:
	$(CLI) data synth $(PRETRAIN_DIR)/corpus --pretraining --n 3000 --seed 2026
	$(CLI) pretrain --train $(PRETRAIN_DIR)/corpus/manifest.csv --out $(PRETRAIN_DIR) --backbone usad-tiny \
		--epochs 30 --batch-size 64 --lr 5e-4 --seed 0 --threads 1 --accelerator cpu
	mkdir -p $(WEIGHTS_DIR)
	cp $(PRETRAIN_DIR)/model.safetensors $(WEIGHTS_DIR)/usad-tiny-synth.safetensors
	cp $(PRETRAIN_DIR)/pretrain.json $(WEIGHTS_DIR)/usad-tiny-synth.json

clean:
	rm -rf runs .usad_cache .pytest_cache .ruff_cache
