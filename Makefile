# fedpers: every command a person needs. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-fast bench proto lint docker-test clean help

help:
	@echo "make demo         create .venv, install, run the federated simulation on the digits data"
	@echo "make test         create .venv, install the test, postgres and ray extras, run the whole test suite"
	@echo "make test-fast    the suite without the slow end-to-end and Docker tests (the inner loop)"
	@echo "make bench        print the footprint, speed, memory, wire, server, journal, robust, load, replicas and personalization tables"
	@echo "make proto        regenerate common/rpc from proto/federation.proto"
	@echo "make lint         ruff over the code"
	@echo "make docker-test  build the image and run the docker-compose fleet test"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "fedpers needs Python >= 3.11 (found: $$($(PYTHON) --version))"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "could not create $(VENV): on Debian/Ubuntu run 'apt-get install python3-venv'"; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,postgres,ray]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/fedpers-sim --devices 8 --rounds 10 --codec int2+zstd --downlink-codec int4+zstd

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not docker"

bench: $(STAMP)
	$(PY) bench/footprint.py
	$(PY) bench/speed.py
	$(PY) bench/memory.py
	$(PY) bench/wire.py
	$(PY) bench/server.py
	$(PY) bench/journal.py
	$(PY) bench/robust.py
	$(PY) bench/load.py
	$(PY) bench/replicas.py
	$(PY) bench/personalization.py

proto: $(STAMP)
	$(PY) -m fedpers.rpc.generate

lint: $(STAMP)
	$(VENV)/bin/ruff check common client server tests bench docker

docker-test: $(STAMP)
	$(PY) -m pytest -q -m docker tests/test_docker.py -rs

clean:
	rm -rf $(VENV) .pytest_cache runs
