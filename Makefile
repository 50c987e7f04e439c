# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv on first use and install the project with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint install clean bench

install: $(STAMP)

# torch is pinned to 2.13.0 (the CPU wheel) unless the interpreter that creates the venv can
# already import a torch: then the venv sees it (--system-site-packages), so a CUDA build is kept.
$(STAMP): setup.cfg pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "using the torch already importable by $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokenprune run experiments/asap_shapes.yaml

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# the end-to-end sweeps marked slow (every preset and the real processor on the newer families)
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info

bench: $(STAMP)
	$(VENV)/bin/tokenprune bench experiments/bench.yaml --json docs/benchmarks.json --markdown docs/benchmarks.md
