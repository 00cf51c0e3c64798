# headrace developer commands. `make test` sets itself up from nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= models
PORT ?= 50051
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: help venv test lint typecheck pytest protos protos-check serve demo-models bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: it is a CPU build on local disk; a bare torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP) ## create the virtualenv and install headrace[dev] (editable)

# mypy sees the package-dir mapping through a tree of links (setuptools' editable finder is invisible to it)
.cache/typecheck/headrace:
	mkdir -p $@
	for p in client server edge build; do ln -sfn ../../../$$p $@/$$p; done

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check client/*.py scripts

typecheck: $(STAMP) .cache/typecheck/headrace ## mypy (strict on the client)
	cd .cache/typecheck && ../../$(VENV)/bin/mypy --config-file ../../pyproject.toml \
		-p headrace.client -p headrace.server -p headrace.edge -p headrace.build

protos: $(STAMP) ## regenerate client/v1 from protos/
	$(PY) scripts/gen_protos.py

protos-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

pytest: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test: $(STAMP) protos-check lint typecheck pytest ## install from nothing, then ruff, mypy, pytest

demo-models: $(STAMP) ## build the demo models into $(MODELS)/ (cached: a second run returns at once)
	$(VENV)/bin/headrace build demo --out $(MODELS)

serve: demo-models ## build the demo models if missing, then serve them on $(PORT)
	$(VENV)/bin/headrace serve --models $(MODELS) --port $(PORT)

bench: demo-models ## load benchmark vs the raw limit and the peers; report in bench/results/
	$(PY) -m bench.run --models $(MODELS) --out bench/results

clean: ## remove caches (keeps the virtualenv, the models and the bench peers' virtualenv)
	rm -rf .cache/typecheck .cache/setuptools-build .cache/setuptools-bdist .pytest_cache .mypy_cache .ruff_cache
