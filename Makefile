# hostfw build/test entry points. CI runs `make test` (see .ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON3     ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
# Whatever packaging files exist; the stamp is rebuilt when one is newer.
SETUP_FILES := $(wildcard setup.cfg setup.py pyproject.toml)
# ruff/pytest only get the directories that exist (some are written later).
LINT_DIRS   := $(wildcard agent tests scripts demo bench)
SH_FILES    := $(wildcard scripts/*.sh devstack/plugin.sh devstack/settings) .ci/run
PYTEST_ARGS ?=

.PHONY: all deps venv test lint demo clean-netns bench soak

all: test

# The script is idempotent and quick when everything is present, so no stamp.
deps:
	@scripts/install-deps.sh

venv: deps $(STAMP)

# Created once; pip is upgraded only then.
$(PY):
	$(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

$(STAMP): $(SETUP_FILES) | $(PY)
	@if [[ -n "$(SETUP_FILES)" ]]; then \
	    echo "$(VENV)/bin/pip install -q -e '.[test]'"; \
	    $(VENV)/bin/pip install -q -e '.[test]'; \
	else \
	    echo "venv: no setup.cfg/setup.py yet; nothing to install" >&2; \
	fi
	@touch $@

lint: venv
	$(VENV)/bin/ruff check $(LINT_DIRS)
	@if command -v shellcheck >/dev/null; then \
	    echo "shellcheck $(SH_FILES)"; shellcheck -s bash $(SH_FILES); \
	fi

test: venv
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests/

demo: venv
	$(PY) -m demo

# Benchmarks (bench/): writes bench/results/latest.json, latest.md and *.png.
# BENCH_ARGS=--quick for a smoke run. Never part of `make test`.
BENCH_ARGS ?=
bench: venv
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[test,bench]'
	$(PY) -m bench $(BENCH_ARGS)

# The reliability suite, SOAK_SCALE times longer than in `make test`.
SOAK_SCALE ?= 10
soak: venv
	HOSTFW_SOAK_SCALE=$(SOAK_SCALE) $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) \
	    tests/reliability/

# Leftover hfwt-* namespaces of dead test runs; FORCE=1 removes all of them.
clean-netns:
	@FORCE="$(FORCE)" scripts/clean-netns.sh
