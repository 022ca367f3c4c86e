# Two commands on a fresh machine:  `make demo` (set-up + the demo sweep) and `make test` (set-up + the tests).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

.PHONY: setup demo test
setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/python sweeps/tiny.py $(ARGS)

test: setup
	$(VENV)/bin/ruff check lora_search tests sweeps benchmarks
	$(VENV)/bin/python -m pytest -q $(ARGS)
