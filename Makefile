# headrace developer commands. `make test` sets itself up from nothing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= models
PORT ?= 50051
LOCK := requirements/dev.lock
# the CPU build of torch lies here on our machines; the lock pins it by hash
TORCH_FIND_LINKS ?= /opt/wheels
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)

.PHONY: help venv lock lock-check test lint typestubs typecheck pytest soak protos protos-check serve demo-models bench bench-overhead clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 16

$(STAMP): pyproject.toml $(LOCK)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# exactly the locked set, every file checked against its hash (torch: the CPU build)
	$(PY) -m pip install -q --require-hashes --no-deps \
		$(if $(wildcard $(TORCH_FIND_LINKS)),--find-links $(TORCH_FIND_LINKS)) -r $(LOCK)
	# an egg-info left in the root by an older layout would shadow the installed metadata
	rm -rf headrace.egg-info
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*; touch $@

venv: $(STAMP) ## create the virtualenv and install headrace[dev] (editable)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check client/*.py scripts

# the TensorRT API's type stubs alone (the `tensorrt-stubs` wheel declares the multi-GB tensorrt
# wheel as a dependency): into their own folder, read by mypy only, never imported
TYPESTUBS := .cache/typestubs
TYPESTUBS_STAMP := $(TYPESTUBS)/.installed-$(shell sha1sum requirements/typing.lock | cut -c1-12)

$(TYPESTUBS_STAMP): requirements/typing.lock | $(STAMP)
	rm -rf $(TYPESTUBS)
	$(PY) -m pip install -q --no-deps --require-hashes --target $(TYPESTUBS) -r requirements/typing.lock
	# two slips of the generated 10.13 stubs that stop mypy (syntax errors): plugin parameters
	# named `in` (a keyword), and a parameter without a default after defaulted ones
	sed -i -E -e 's/([(,] *)in: /\1in_: /g' -e 's/, channel_axis: int\)/, channel_axis: int = ...)/' \
		$(TYPESTUBS)/tensorrt_bindings/tensorrt.pyi
	touch $@

typestubs: $(TYPESTUBS_STAMP)

# mypy finds headrace.* through src/headrace/ (pyproject [tool.mypy] mypy_path), as Python does;
# MYPYPATH adds the TensorRT stubs before it
typecheck: $(STAMP) $(TYPESTUBS_STAMP) ## mypy (strict on the client; TensorRT code against its stubs)
	MYPYPATH=$(CURDIR)/$(TYPESTUBS) $(VENV)/bin/mypy \
		-p headrace.v1 -p headrace.client -p headrace.server -p headrace.edge -p headrace.build

lock: ## re-resolve requirements/*.lock from pyproject.toml (uv, needs the index)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install -q "uv>=0.9,<1"
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/lock.py

lock-check: $(STAMP)
	$(PY) scripts/lock.py --check

protos: $(STAMP) ## regenerate the generated code (protos/headrace/v1, server/kserve/pb)
	$(PY) scripts/gen_protos.py

protos-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

pytest: $(STAMP)
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

soak: $(STAMP) ## 100,000 Classify calls from 64 callers against `headrace serve`, 0 errors (minutes)
	nice $(PY) -m pytest -q -ra -s -m soak tests/reliability $(PYTEST_ARGS)

test: $(STAMP) lock-check protos-check lint typecheck pytest ## install from nothing, then ruff, mypy, pytest

demo-models: $(STAMP) ## build the demo models into $(MODELS)/ (cached: a second run returns at once)
	$(VENV)/bin/headrace build demo --out $(MODELS)

serve: demo-models ## build the demo models if missing, then serve them on $(PORT)
	$(VENV)/bin/headrace serve --models $(MODELS) --port $(PORT)

bench: demo-models ## load benchmark vs the raw limit and the peers; report in bench/results/
	$(PY) -m bench.run --models $(MODELS) --out bench/results

bench-overhead: $(STAMP) ## per-request cost: headrace vs the bare grpc.aio floor and the raw backend (tiny models, ~3 min)
	$(PY) -m bench.overhead --out bench/results/overhead.raw.json

clean: ## remove caches (keeps the virtualenv, the models and the bench peers' virtualenv)
	rm -rf .cache/setuptools-build .cache/setuptools-bdist .pytest_cache .mypy_cache .ruff_cache
