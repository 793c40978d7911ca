# Two entry points that each do all set-up on a fresh machine:
#   make quickstart   venv + install, sample data, prep on it, dataset summary
#   make test         venv + install, sample videos, the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hpcvid-installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup quickstart test clean-quickstart

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/python -m data_prep.quickstart_data data/quickstart
	$(BIN)/hpcvid prep jobs/quickstart_prep.yaml
	$(BIN)/hpcvid inspect data/quickstart/latents

test: $(STAMP)
	$(BIN)/python -m data_prep.fetch_samples
	$(BIN)/python -m pytest -q tests

clean-quickstart:
	rm -rf data/quickstart
