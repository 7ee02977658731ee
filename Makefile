# labkit: every target runs from the repo root, whatever folder make was started in.
ROOT := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT).venv

.PHONY: setup test run clean-labs

setup:  ## system packages, kernel-header links, .venv (idempotent; a re-run takes ~1 s)
	bash $(ROOT)setup.sh

test: setup
	cd $(ROOT) && $(VENV)/bin/python -m pytest -q --durations=15 tests

run: setup
	cd $(ROOT) && $(VENV)/bin/labkit run service-scale --quick

clean-labs:  ## tear down every lab (lk-* namespaces and kernel objects)
	cd $(ROOT) && $(VENV)/bin/labkit down --all
