# defjax: `make train` and `make test` work on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FMNIST := $(FMNIST_DIR)/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKDIR ?= runs/quickstart

.PHONY: install malloc data test test-stress install-check train docs bench bench-link bench-gpu fmt fmt-check clean

install: $(STAMP) malloc

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[train,test]'
	touch $@

# tcmalloc: train.py restarts itself under it when it is installed
# (defjax/training/main.py), so that XLA:CPU's fresh buffers reuse freed pages instead
# of faulting in new ones every step (bench/allocator.py). Optional: tried
# once per venv (Debian 12: libtcmalloc-minimal4; newer: ...-minimal4t64).
MALLOC_STAMP := $(VENV)/.malloc-tried

malloc: $(MALLOC_STAMP)

$(MALLOC_STAMP): $(STAMP)
	@if ! /sbin/ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4 \
	  && command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && { $(SUDO) apt-get install -y -qq libtcmalloc-minimal4 \
	  || $(SUDO) apt-get install -y -qq libtcmalloc-minimal4t64; } \
	  || echo "no tcmalloc: train.py keeps the C library's malloc"; fi
	touch $@

# The programs below get tcmalloc preloaded from the start, as train.py would
# restart itself to get it, unless DEFJAX_ALLOCATOR=system or LD_PRELOAD is
# already set (found when they run: `make malloc` may have just installed it;
# a soname, which the loader resolves for the interpreter's architecture).
PRELOAD = LD_PRELOAD="$$(if [ -z "$$LD_PRELOAD" ] && [ "$$DEFJAX_ALLOCATOR" != system ] \
  && /sbin/ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; \
  then echo libtcmalloc_minimal.so.4; else echo "$$LD_PRELOAD"; fi)" \
  TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=$${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}

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
PYTEST = $(PRELOAD) $(PY) -m pytest -q -n $(PYTEST_WORKERS) --max-worker-restart=4
test: install data
	$(PYTEST) --durations=15 -m 'not stress'

# The tests that slow the machine or a link on purpose (busy processes, a
# device 45 s late, a killed peer, a 100 Mbit/s link): 2-3 minutes, most of it
# waiting, kept out of make test's ten minutes; CI runs them after it.
test-stress: install data
	$(PYTEST) -m stress

# The install promise, from a built wheel (tests/install_check.py): the sdist,
# the wheel built from it and installed without extras into a fresh venv in a
# temporary folder, which must then hold only jax, flax, optax, numpy and their
# dependencies, run the README's library example, and answer defjax-train with
# one line and exit 2. 2-3 minutes on 2 cores (136-181 s measured).
install-check: install
	$(PY) tests/install_check.py

# The documentation site, warnings as errors: docs/_build/html/index.html.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q -e '.[docs]'
	touch $@

docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@# A type printed where jax defines it (jax._src.mesh.Mesh) is no name a
	@# reader can import: name it in the docstring ('mesh (jax.sharding.Mesh)').
	@! grep -rl --include='*.html' 'jax\._src' docs/_build/html \
	  || { echo 'error: the pages above print a private jax path'; exit 1; }

train: install data
	$(PRELOAD) $(PY) train.py --config configs/fashion_mnist.py --workdir $(WORKDIR)

bench: install data
	$(PRELOAD) $(PY) -m bench.run_all

# The slow-link benchmark (root, Linux: network namespaces and tc): train
# steps of SGD, DEF and EF across a throttled veth between two processes,
# beside PyTorch DDP with its PowerSGD and fp16 hooks (torch: the bench
# extra), then train.py as two hosts to a stated accuracy on CIFAR-10 (the
# JPEG tar at CIFAR_TAR when it exists, else TFDS's cifar10; 2 epochs, which
# three runs finish in about an hour here). About an hour and a half on 2
# cores; writes bench/results/slow_link*.json and the plot: the recorded ones
# come from exactly these commands.
CIFAR_TAR ?= $(abspath ../shared/data/cifar10-jpeg.tar)
bench-link: install data
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PRELOAD) $(PY) -m bench.slow_link --rounds 4 --steps 2
	$(PRELOAD) $(PY) -m bench.slow_link_train --epochs 2 \
	  $(if $(wildcard $(CIFAR_TAR)),--image-folder $(CIFAR_TAR))
	$(PY) -m bench.run_all --summary-only

# One GPU (about 5 minutes on an H200): SGD vs DEF steps/s, compile time,
# memory and wire bytes for VGG-16 and ResNet-50 with K = 8 vmapped workers;
# writes bench/results/gpu.json and the README's gpu table.
bench-gpu: install
	$(VENV)/bin/pip install -q -e '.[cuda]'
	$(PY) -m bench.gpu

# The formatter (pyproject's [tool.pyink]: 2-space indents, 80 columns).
FMT_PATHS := defjax tests bench configs train.py

fmt: install
	$(VENV)/bin/pip install -q -e '.[fmt]'
	$(VENV)/bin/pyink $(FMT_PATHS)

fmt-check: install
	$(VENV)/bin/pip install -q -e '.[fmt]'
	$(VENV)/bin/pyink --check --diff $(FMT_PATHS)

clean:
	rm -rf $(VENV) runs .pytest_cache .cache docs/_build
