# Two entry points for a fresh machine: `make run` and `make test`.
# Both are idempotent: the venv is created when missing and (re)installed only when
# pyproject.toml or constraints.txt changed since the last install.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ramflow-installed
PIP := $(BIN)/python -m pip
# Nothing may fetch weights or data at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps run test test-fast bench clean

## System parts: WordNet (tag synonyms) and Chromium (browser test), through apt when missing.
system-deps:
	@missing=""; \
	[ -f /usr/share/wordnet/data.noun ] || missing="$$missing wordnet-base"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml constraints.txt
	$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel -c constraints.txt
	$(PIP) install -c constraints.txt torch torchvision
	$(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $@

install: $(STAMP)

run: install
	$(BIN)/ramflow run

test: install
	$(BIN)/python -m pytest

## The unit tier for daily work: no end-to-end pipelines, servers, browser or official weights.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser and not official"

## Every benchmark; one whose input data is absent (e.g. ../shared on a fresh clone) exits 77
## (bench/_skip.py) and is listed as skipped, any other failure fails the target.
bench: install
	@skipped=""; failed=""; \
	for b in bench/bench_*.py; do \
	  echo "== $$b"; $(BIN)/python $$b; rc=$$?; \
	  if [ $$rc = 77 ]; then skipped="$$skipped $$b"; elif [ $$rc != 0 ]; then failed="$$failed $$b"; fi; \
	done; \
	echo "skipped (input data absent):$${skipped:- none}"; \
	if [ -n "$$failed" ]; then echo "failed:$$failed"; exit 1; fi

clean:
	rm -rf data .pytest_cache
