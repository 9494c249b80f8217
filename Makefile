# Thin wrappers over the `recsys-moe` CLI. The first target you type creates
# .venv and installs everything once (stamp file); later targets reuse it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip install --disable-pip-version-check -c requirements/constraints.txt
CONFIG ?= configs/default.toml
EXTRAS ?= cpu,dev

export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONPATH := $(CURDIR)

.PHONY: install train retrain features generate ui serve score extend test lint format docs bench bench-soak bench-peers bench-regimes bench-quality clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on disk; later installs are pinned to it by the constraints file.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[$(EXTRAS)]'
	# torchrec's metadata names the CUDA fbgemm-gpu; we use fbgemm-gpu-cpu, so no deps here.
	$(PIP) --no-deps torchrec==1.8.0
	$(BIN)/python -c "import torchrec, fbgemm_gpu, ray, mlflow, polars; print('install ok')"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install (runs once)

generate: $(STAMP)  ## generate the synthetic raw log (data/raw/default)
	$(BIN)/recsys-moe generate --config $(CONFIG)

features: $(STAMP)  ## build the feature store from the raw log
	$(BIN)/recsys-moe features --config $(CONFIG)

train: $(STAMP)  ## generate (if missing) -> features -> distributed train -> MLflow run + registry
	$(BIN)/recsys-moe generate --config $(CONFIG) --if-missing
	$(BIN)/recsys-moe features --config $(CONFIG)
	$(BIN)/recsys-moe train --config $(CONFIG)

WINDOW_DAYS   ?= 1
RETRAIN_STORE ?= data/features/$(basename $(notdir $(CONFIG)))-retrain

retrain: $(STAMP)  ## warm-start the champion on the newest WINDOW_DAYS days of the log (its ids kept, new ones appended) -> MLflow run + gated promotion to ALIAS (default champion)
	$(BIN)/recsys-moe features --config $(CONFIG) --window-days $(WINDOW_DAYS) --grow-from --set features.store_dir=$(RETRAIN_STORE)
	$(BIN)/recsys-moe train --config $(CONFIG) --warm-start --set features.store_dir=$(RETRAIN_STORE) $(if $(ALIAS),--alias $(ALIAS))

CANDIDATES ?= data/candidates/default
SCORES     ?= data/scores/default
ROWS       ?= 1000000

score: $(STAMP)  ## batch-score CANDIDATES (made from the store if missing) with the champion -> SCORES
	test -d $(CANDIDATES) || $(BIN)/recsys-moe candidates --config $(CONFIG) --rows $(ROWS) --output $(CANDIDATES)
	$(BIN)/recsys-moe score --config $(CONFIG) --input $(CANDIDATES) --output $(SCORES)

DOMAIN ?=
DATA   ?=

extend: $(STAMP)  ## add domain DOMAIN from the raw log DATA to the champion (new version, gated promotion)
	@test -n "$(DOMAIN)" -a -n "$(DATA)" || { echo "usage: make extend DOMAIN=<name> DATA=<raw log folder>"; exit 2; }
	$(BIN)/recsys-moe extend --config $(CONFIG) --domain $(DOMAIN) --data $(DATA)

serve: $(STAMP)  ## the ranking service (serving/config.yaml) on 127.0.0.1:8000 over the champion
	$(BIN)/recsys-moe serve --serve-config $(or $(SERVE_CONFIG),serving/config.yaml)

ui: $(STAMP)  ## MLflow UI over the tracking store on 127.0.0.1:5000 (UI_PORT=...)
	$(BIN)/recsys-moe ui --port $(or $(UI_PORT),5000)

test: $(STAMP)  ## run the test suite
	$(BIN)/python -m pytest

lint: $(STAMP)  ## ruff check + format check + import contracts (layers, pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

docs: $(STAMP)  ## regenerate docs/configuration.md from the config dataclasses
	$(BIN)/python -m recsys_moe.config_reference

format: $(STAMP)  ## ruff format + autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## throughput benchmarks (after `make train`; writes bench/RESULTS.md sections)
	$(BIN)/python -m bench.features
	$(BIN)/python -m bench.train_throughput
	$(BIN)/python -m bench.train_layouts
	$(BIN)/python -m bench.batch_score
	$(BIN)/python -m bench.serve_latency
	$(BIN)/python -m bench.kernels
	$(BIN)/python -m bench.offload

bench-soak: $(STAMP)  ## 10 minutes of `wrk` at concurrency 16 against the shipped service, a champion hot swap halfway (after `make train`; needs wrk)
	$(BIN)/python -m bench.soak

bench-peers: $(STAMP)  ## the model against torch-rechub's MMoE / PLE / SharedBottom (sparse, default, real data: MovieLens, Census, Douban, Women's E-Commerce)
	$(PIP) -e '.[peers]'
	$(BIN)/python -m bench.quality.peers --config configs/sparse.toml --config configs/default.toml \
		$(if $(wildcard ../shared/data/movielens_100k),--config configs/movielens.toml) \
		$(if $(wildcard ../shared/data/census_income_kdd),--config configs/census.toml) \
		$(if $(wildcard ../shared/data/douban_book_music),--config configs/douban.toml) \
		$(if $(wildcard ../shared/data/womens_ecommerce_reviews),--config configs/womens_ecommerce.toml)

bench-regimes: $(STAMP)  ## the regime suite: default and sparse models against torch-rechub on 8 generated regimes (half held out) and the real sets; 3 seeds (~45 min)
	$(PIP) -e '.[peers]'
	$(BIN)/python -m bench.quality.regimes --real

bench-quality: $(STAMP)  ## model-quality scripts (MMoE synthetic, Census, architectures, newest rows, extend, add experts, segment experts, routing health; ~95 min)
	$(BIN)/python -m bench.quality.mmoe_synthetic
	$(BIN)/python -m bench.quality.newest \
		$(if $(wildcard ../shared/data/movielens_100k),,--config configs/sparse.toml)
	$(BIN)/python -m bench.quality.archs --config configs/census.toml --archs shared_bottom mmoe ple \
		--note "Census-Income KDD: only the 99,762-row test file is at hand, split here by row order 80/10/10; a public MMoE reference reports about 0.945 (income) and 0.993 (never married) AUC trained on the full 199,523-row training file."
	$(BIN)/python -m bench.quality.archs --config configs/default.toml
	$(BIN)/python -m bench.quality.extend
	$(BIN)/python -m bench.quality.add_experts --config configs/default.toml
	$(BIN)/python -m bench.quality.segments
	$(BIN)/python -m bench.quality.routing

clean:  ## remove generated data, runs and the virtualenv
	rm -rf $(VENV) data mlruns mlflow.db checkpoints models logs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
