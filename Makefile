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

# The suite runs on TEST_WORKERS processes (pytest-xdist; each file's tests stay on one worker, so
# a file's servers and models start once), then the tests marked `serial` (they read how busy the
# cores are) alone. Exit status 5 is pytest's "no tests collected": ARGS may pick none of a kind.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial" --durations=25 $(ARGS) || [ $$? -eq 5 ]
	$(VENV)/bin/python -m pytest -q -m serial $(ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
