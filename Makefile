# Two entry points for a fresh machine (see README):
#   make demo   set up, fetch the bundled model + corpus, quantize SmolLM2 and print FP vs quantized perplexity
#   make test   set up, fetch the bundled assets, run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/awq-w4a16-quick.yaml
OUT ?= out/demo
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup assets demo test test-fast clean

setup: $(VENV)/.qtool-setup

# torch is installed first and pinned on CPU machines: an unpinned resolve pulls a multi-GB CUDA build.
$(VENV)/.qtool-setup: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch; \
	  else $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e ".[data,eval,test]"
	$(BIN)/python -m pip check >/dev/null || $(BIN)/python -m pip check
	touch $@

assets: setup
	$(BIN)/qtool assets fetch

demo: assets
	$(BIN)/qtool quantize -c $(RECIPE) -o $(OUT) --overwrite --eval

test: assets
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf out build *.egg-info .pytest_cache
