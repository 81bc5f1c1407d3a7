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
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/girandole serve $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=25 $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
