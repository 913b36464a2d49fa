# The two commands of the README: `make demo` (the main job on a bundled mesh) and
# `make test` (the suite). Each creates or reuses the virtual environment $(VENV).
VENV ?= .venv
PYTHON ?= python3
# A CPU build of torch that lies on disk on our machines; a GPU user passes e.g.
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.miner3d-installed

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/miner3d fit meshes/lucy.ply -o runs/demo --force

# ruff, and the layer contract of the package (pyproject.toml, [tool.importlinter])
lint: $(STAMP)
	$(BIN)/ruff check miner3d tests scripts
	$(BIN)/ruff format --check miner3d tests scripts
	$(BIN)/lint-imports --no-cache

# everything: lint, then every test (slow ones included: subprocesses, the install, 64 MP)
test: lint
	$(BIN)/python -m pytest

# the inner loop: the tests not marked slow
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
