# Two commands do all set-up:  `make demo`  and  `make test`.
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The extras in pyproject.toml are ranges; here (and so in CI) the builds the project is tested with are
# pinned: the CPU wheels (a looser spec pulls PyPI's CUDA torch, several GB), and the linters CI runs.
PINS := 'torch==2.13.0' 'tensorflow-cpu==2.21.*' 'torchvision==0.28.0' 'ruff==0.17.6' 'mypy==2.4.1'

.PHONY: demo test lint install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,torch,tensorflow,zoo]' $(PINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo_core.py
	$(PY) examples/demo_torch.py
	$(PY) examples/demo_tf.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/plan_scaling.py
	$(PY) benchmarks/torch_overhead.py
	$(PY) benchmarks/tf_vs_grappler.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
