# Two commands do all set-up:  `make demo`  and  `make test`.
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The extras in pyproject.toml are ranges; here (and so in CI) the builds the project is tested with are
# pinned: the CPU wheels (a looser spec pulls PyPI's CUDA torch, several GB), and the linters CI runs.
PINS := 'torch==2.13.0' 'tensorflow-cpu==2.21.*' 'torchvision==0.28.0' 'ruff==0.17.6' 'mypy==2.4.1'

.PHONY: demo test lint install clean bench report-deps

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,torch,tensorflow,zoo,demo]' $(PINS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo_core.py
	$(PY) examples/demo_torch.py
	$(PY) examples/demo_tf.py
	$(PY) examples/demo_keras.py
	$(PY) examples/demo_tune.py
	@echo "make demo: plots (PNG) and plan reports (HTML) are in demo_out/"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# two workers (pytest-xdist): tests/conftest.py groups the tests (a module's on one worker, so its module-scoped
# models are built once; the zoo by model; the multi-process tests in one group), heaviest groups first, and gives
# each worker one intra-op thread (two workers on two cores)
test: lint report-deps
	$(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

bench: $(STAMP)
	$(PY) benchmarks/plan_scaling.py
	$(PY) benchmarks/torch_overhead.py
	$(PY) benchmarks/tf_vs_grappler.py
	$(PY) benchmarks/report_render.py

# The plan report's system tools, from Debian's packages: Graphviz's `dot` lays the graph out, headless
# Chromium renders it in tests/test_report.py. apt-get runs only when one of them is missing (sudo unless root).
APT_GET := $(shell [ "$$(id -u)" = 0 ] || echo sudo) apt-get
report-deps:
	@command -v dot >/dev/null && command -v chromium >/dev/null \
	  || $(APT_GET) install -y graphviz chromium \
	  || { $(APT_GET) update && $(APT_GET) install -y graphviz chromium; }

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
