# Two entry points that work on a fresh machine: `make demo` (set up, then run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch builds that lie on this project's machines' local disk; override on other machines (torch>=2.11 works).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test,deploy]'
	touch $@

demo: setup
	$(VENV)/bin/vitkit models
	$(VENV)/bin/vitkit config --config_path configs/vit_patch32_imagenet2012_config_standalone.yml --batch_size=64

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
