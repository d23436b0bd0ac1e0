# Two entry points: `make demo` (set up + run the demo job) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test setup setup-test lint bench clean browser mutants

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# constraints.txt pins torch, torchvision and Ray: the same set as deploy/Dockerfile.
$(STAMP_RUN): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet -c constraints.txt -e .
	touch $@

$(STAMP_TEST): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP_RUN) $@

setup: $(STAMP_RUN)
setup-test: $(STAMP_TEST) browser

# Debian's chromium for the HTML report test (skipped when apt is unavailable and no chromium exists).
browser:
	@command -v chromium >/dev/null 2>&1 || scripts/install-chromium.sh

demo: setup
	$(VENV)/bin/salmap run

test: setup-test
	$(VENV)/bin/ruff check pipeline workers tests bench scripts
	$(PY) -m pytest -q tests

bench: setup-test
	$(PY) bench/run_all.py

# Mutation testing of the metric formulas and the seed methods (TESTING.md): hours on 2 cores,
# so not part of `make test`; run it before resolving an issue that touches metrics or methods.
# `make mutants ONLY=road,sparseness` for some files; the table lands in runs/mutants/mutants.md.
ONLY ?=
mutants: setup-test
	$(PY) scripts/mutants.py --jobs 2 $(if $(ONLY),--only $(ONLY)) --out runs/mutants/mutants.json --md runs/mutants/mutants.md

clean:
	rm -rf $(VENV) runs .pytest_cache
