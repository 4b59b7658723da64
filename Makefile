# Two commands do all set-up:  `make demo`  and  `make test`.
# Each creates .venv on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,torch,tensorflow,zoo]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo_core.py
	$(PY) examples/demo_torch.py
	$(PY) examples/demo_tf.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/plan_scaling.py
	$(PY) benchmarks/torch_overhead.py
	$(PY) benchmarks/tf_vs_grappler.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
