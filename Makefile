# defjax: `make train` and `make test` work on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST := $(FMNIST_DIR)/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKDIR ?= runs/quickstart

.PHONY: install malloc data test train bench bench-gpu clean

install: $(STAMP) malloc

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[train,test]'
	touch $@

# tcmalloc: train.py restarts itself under it when it is installed
# (defjax/main.py), so that XLA:CPU's fresh buffers reuse freed pages instead
# of faulting in new ones every step (bench/allocator.py). Optional.
TCMALLOC := $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4)

malloc:
	@if [ -z "$(TCMALLOC)" ] && command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libtcmalloc-minimal4 \
	  || echo "apt-get failed: train.py keeps the C library's malloc"; fi
# The programs below get it preloaded from the start (found when they run, as
# `make malloc` may have just installed it), so train.py need not restart.
PRELOAD = LD_PRELOAD="$$(ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 \
  2>/dev/null | head -n 1) $$LD_PRELOAD"

# Fashion-MNIST from Debian's package; without apt the loader downloads the
# four idx files from the dataset's official address instead.
data: $(FMNIST)

$(FMNIST):
	@if command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist \
	  || echo "apt-get failed: the loader will download Fashion-MNIST instead"; \
	else echo "no apt-get: the loader will download Fashion-MNIST instead"; fi

# Two pytest workers (pytest-xdist): the suite's compiles and subprocess runs
# overlap on two cores, and a test that crashes its process (e.g. an XLA
# abort) is reported as one failed test while the rest of the suite goes on.
PYTEST_WORKERS ?= 2
test: install data
	$(PRELOAD) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --max-worker-restart=4 --durations=15

train: install data
	$(PRELOAD) $(PY) train.py --config configs/fashion_mnist.py --workdir $(WORKDIR)

bench: install data
	$(PRELOAD) $(PY) -m bench.run_all

# One GPU (about 5 minutes on an H200): SGD vs DEF steps/s, compile time,
# memory and wire bytes for VGG-16 and ResNet-50 with K = 8 vmapped workers;
# writes bench/results/gpu.json and the README's gpu table.
bench-gpu: install
	$(VENV)/bin/pip install -q -e '.[cuda]'
	$(PY) -m bench.gpu

clean:
	rm -rf $(VENV) runs .pytest_cache .cache
