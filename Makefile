# Two entry points that each do all set-up on a fresh machine:
#   make quickstart   venv + install, sample data -> pixel shards; train a tiny Reducio-VAE on 2 ranks, evaluate it,
#                     prep Reducio latent shards with it, train the tiny keyframe and motion DiTs on 2 ranks (FSDP2),
#                     sample a clip from a prompt, and render a 2,304-frame video over 2 MPI ranks (clip parallelism)
#   make test         venv + install, sample videos, the test suite
# "venv + install" builds .venv/ from the lock requirements/lock-cpu-py311.txt alone (exact versions and hashes), so
# every install is the same; a change to the lock or to setup.py rebuilds .venv/ from scratch.
#   make lock         re-resolve the lock after editing setup.py or requirements/cpu-py311.in; other pins stay
#   make lock-upgrade move every package in the lock to its newest allowed release
# Both lock targets run pip-compile (pip-tools) from the throwaway venv .venv-lock/. GPU clusters: docs/install.md.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hpcvid-installed
LOCK    := requirements/lock-cpu-py311.txt
LOCK_IN := requirements/cpu-py311.in
LOCK_VENV  ?= .venv-lock
LOCK_TOOLS := pip==26.3 pip-tools==7.6.2
QUICKSTART_AE_STEPS ?= 100
QUICKSTART_DIT_STEPS ?= 200
export OMP_NUM_THREADS ?= 1

# The lock holds cp311 wheels: fail with one line on another Python rather than deep inside pip.
CHECK_PYTHON = @$(PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; \
  sys.exit(v != "3.11" and f"$(LOCK) is for Python 3.11, $(PYTHON) is {v}: set PYTHON=python3.11 (see docs/install.md)")'

.PHONY: setup quickstart test lock lock-upgrade clean-quickstart

# --clear: packages dropped from the lock must not linger. --no-deps: nothing outside the lock can come in, and
# pip check then proves the lock is complete. --no-build-isolation: the project is built with the locked setuptools
# instead of whatever is newest that day.
$(STAMP): setup.py $(LOCK)
	$(CHECK_PYTHON)
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check || { echo "$(LOCK) does not cover setup.py: run make lock" >&2; exit 1; }
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
	$(BIN)/mpiexec -n 2 $(BIN)/hpcvid train jobs/tiny_keyframe.yaml --set train.steps=$(QUICKSTART_DIT_STEPS)
	$(BIN)/mpiexec -n 2 $(BIN)/hpcvid train jobs/tiny_motion.yaml --set train.steps=$(QUICKSTART_DIT_STEPS)
	$(BIN)/hpcvid sample jobs/tiny_sample.yaml          # its prompt; any other: --prompt "..."
	$(BIN)/mpiexec -n 2 $(BIN)/hpcvid render jobs/tiny_render.yaml   # 144 clips = 2,304 frames; prints video + report

test: $(STAMP)
	$(BIN)/python -m data_prep.fetch_samples
	$(BIN)/python -m pytest -q tests

# pip-compile uses pip's resolver and reads pip's find-links and indexes, so it finds the CPU torch wheel that this
# machine's pip config points at (uv and poetry ignore pip's configuration and would lock a CUDA torch). Those
# options stay out of the lock: they are this machine's, and the hashes pin the files anyway. pip-compile works on
# a copy (it keeps the pins it finds there); the lock is replaced only when it changed, so that an unchanged lock
# does not rebuild .venv/.
define compile_lock
	$(CHECK_PYTHON)
	test -x $(LOCK_VENV)/bin/pip-compile || $(PYTHON) -m venv --clear $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS)
	if [ -f $(LOCK) ]; then cp $(LOCK) $(LOCK).tmp; fi
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet $(1) --extra test --generate-hashes \
	  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --output-file $(LOCK).tmp \
	  setup.py $(LOCK_IN)
	cat requirements/lock-header.txt $(LOCK).tmp > $(LOCK).new && rm $(LOCK).tmp
	if cmp -s $(LOCK).new $(LOCK); then rm $(LOCK).new; echo "$(LOCK) unchanged"; else mv $(LOCK).new $(LOCK); fi
endef

lock:
	$(call compile_lock,)

lock-upgrade:
	$(call compile_lock,--upgrade)

clean-quickstart:
	rm -rf data/quickstart runs/tiny_reducio runs/tiny_cmd runs/tiny_keyframe runs/tiny_motion runs/tiny_sample
