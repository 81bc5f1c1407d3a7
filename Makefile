# The two set-up commands of the README: `make serve` and `make test`. Each installs what it
# needs into .venv first (torch's CPU wheel before anything that depends on torch).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: serve test install lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q torch==2.13.0
	# xgrammar (structured output) declares triton, a 286 MB GPU compiler it does not need on CPU.
	$(VENV)/bin/pip install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/girandole serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
