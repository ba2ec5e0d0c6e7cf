# Set-up and the two commands the README promises: `make demo` and `make test`.
# torch/torchvision are pinned to the releases this workplace keeps on disk (pip installs them without downloading).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

# The main job on real data: Fashion-MNIST from Debian's package (installed here when missing and apt-get is
# there), the demo recipe into runs/demo (a rerun replaces the last demo: --overwrite), then the evaluation on the
# 10,000 test images.
FMNIST := /usr/share/datasets/fashion-mnist
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

demo: $(STAMP)
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	    $(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	      { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; } || exit 1; \
	  else \
	    echo "Fashion-MNIST is missing from $(FMNIST) and there is no apt-get: put the four .gz files from"; \
	    echo "https://github.com/zalandoresearch/fashion-mnist (data/fashion) in a folder and run"; \
	    echo "  $(BIN)/cvt train --config configs/fashion_mnist_demo.yaml --data-dir FOLDER --out runs/demo"; \
	    echo "  $(BIN)/cvt eval --checkpoint runs/demo/model.safetensors --data-dir FOLDER"; \
	    exit 1; \
	  fi; \
	fi
	$(BIN)/cvt train --config configs/fashion_mnist_demo.yaml --out runs/demo --overwrite
	$(BIN)/cvt eval --checkpoint runs/demo/model.safetensors --data fashion-mnist

# ruff over the whole repository (rules in pyproject.toml); `make test` runs it first.
lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf $(VENV) build src/*.egg-info
