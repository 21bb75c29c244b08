# Two entry points that work on a fresh machine: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch builds that lie on this project's machines' local disk; override on other machines (torch>=2.11 works).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

DEMO_DATA := data/fashion-mnist
DEMO_CONFIG := configs/fashion_mnist_vit.yml

.PHONY: setup demo test test-oldest-torch bench-data fuzz clean

setup: $(VENV)/.installed

# setup.py builds the JPEG region decoder and the GELU kernel (C, optional): a change to it or to their sources reinstalls.
$(VENV)/.installed: pyproject.toml setup.py vitkit/data/_jpeg_region.c vitkit/model/_gelu_tanh.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test,deploy,viz,cloud]'
	touch $@

# The main job: Fashion-MNIST as image folders, a small ViT trained from scratch, then evaluated.
# Re-running continues an interrupted run (--resume auto) and re-evaluates a finished one.
demo: setup $(DEMO_DATA)/.complete
	$(VENV)/bin/vitkit train --config_path $(DEMO_CONFIG) --resume auto
	$(VENV)/bin/vitkit eval --config_path $(DEMO_CONFIG) --model outputs/fashion_mnist --report outputs/fashion_mnist/report
	$(VENV)/bin/vitkit plot outputs/fashion_mnist

$(DEMO_DATA)/.complete: | setup
	test -d /usr/share/datasets/fashion-mnist || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist)
	$(VENV)/bin/vitkit data fashion-mnist $(DEMO_DATA)

test: setup
	$(PY) -m pytest -q

# The readers of untrusted input (JPEG decoder, .ckpt, .npz, safetensors, Hugging Face folders, configs) under
# fresh random inputs, FUZZ_EXAMPLES per property test; `make test` runs a short fixed set (docs/fuzzing.md).
FUZZ_EXAMPLES ?= 2000
fuzz: setup
	VITKIT_FUZZ_PROFILE=long VITKIT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# The same suite on the oldest PyTorch that pyproject.toml allows (torch>=2.11), in a venv of its own.
OLDEST_TORCH_PINS ?= torch==2.11.0 torchvision==0.26.0
OLDEST_VENV := .venv-oldest-torch
test-oldest-torch:
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q $(OLDEST_TORCH_PINS)
	$(OLDEST_VENV)/bin/python -m pip install -q -e '.[test,deploy,viz,cloud]'
	$(OLDEST_VENV)/bin/python -m pytest -q

# Data-pipeline throughput against torchvision's standard pipeline on ImageNet-like JPEGs made from real photos.
BENCH_JPEGS := data/bench-jpegs
bench-data: setup
	$(PY) -m pip install -q -e '.[bench]'
	test -f $(BENCH_JPEGS)/.complete || ($(PY) benchmarks/make_jpegs.py $(BENCH_JPEGS) && touch $(BENCH_JPEGS)/.complete)
	$(PY) benchmarks/bench_data.py $(BENCH_JPEGS)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache
