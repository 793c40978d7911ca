# Two entry points that each do all set-up on a fresh machine:
#   make quickstart   venv + install, sample data -> pixel shards; train a tiny Reducio-VAE on 2 ranks, evaluate it,
#                     and prep Reducio latent shards with it (a few minutes on 2 cores)
#   make test         venv + install, sample videos, the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hpcvid-installed
QUICKSTART_AE_STEPS ?= 100
export OMP_NUM_THREADS ?= 1

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
	$(BIN)/mpiexec -n 2 $(BIN)/hpcvid train-ae jobs/tiny_reducio.yaml --set train_ae.steps=$(QUICKSTART_AE_STEPS)
	$(BIN)/hpcvid eval-ae jobs/tiny_reducio.yaml
	$(BIN)/hpcvid prep jobs/quickstart_reducio_prep.yaml
	$(BIN)/hpcvid inspect data/quickstart/latents-reducio

test: $(STAMP)
	$(BIN)/python -m data_prep.fetch_samples
	$(BIN)/python -m pytest -q tests

clean-quickstart:
	rm -rf data/quickstart
