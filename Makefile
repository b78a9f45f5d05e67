# tierlab — the user's commands. `make help` lists them.
#
# Everything runs from a project virtualenv (.venv) that the first command builds by itself.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
STATE := .local/stack.json
# the CPU build of torch; a plain `pip install torch` resolves the multi-GB CUDA build
TORCH ?= torch==2.13.0
DEMO := models/demo
DEPLOYMENT ?= $(DEMO)/deployment.yaml

.DEFAULT_GOAL := help
.PHONY: help venv models models-tiny models-list up down status local demo bench bench-overhead bench-forwarding test test-unit check fmt clean distclean

help: ## list the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo "==> building the Python environment in $(VENV) (first run only)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on '$(TORCH)'
	$(PY) -m pip install --progress-bar on -e '.[operators,report,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP) ## build the Python environment

$(DEPLOYMENT): | $(STAMP)
	$(PY) -m services demo $(DEMO)

models: $(STAMP) ## build every default subject × operator variant into models/ (incremental)
	$(PY) -m operators build

models-tiny: $(STAMP) ## the same with tiny training budgets: a quick, low-accuracy build
	$(PY) -m operators build --tiny

models-list: | $(STAMP) ## built variants: sizes, cut sizes, offline accuracy with 95 % CI
	$(PY) -m operators list

demo: $(STAMP) ## write the demo variants and a local deployment into models/demo
	$(PY) -m services demo $(DEMO)

up: $(STAMP) $(DEPLOYMENT) ## start the three tiers (local processes for now) in the background
	$(PY) -m services local --deployment $(DEPLOYMENT) --detach --state $(STATE)

down: | $(STAMP) ## stop the tiers started by `make up`
	$(PY) -m services down --state $(STATE)

status: | $(STAMP) ## each tier: ready, cgroup limits, onnxruntime threads, link backends
	$(PY) -m services status --deployment $(DEPLOYMENT)

local: $(STAMP) $(DEPLOYMENT) ## run the three tiers in the foreground until Ctrl-C
	$(PY) -m services local --deployment $(DEPLOYMENT)

bench: bench-overhead ## the main benchmark (today: the testbed's own overhead, P1-P3)

bench-overhead: $(STAMP) ## P1 hop tax, P2 codec, P3 serving throughput; last line is JSON
	$(PY) -m benchmarks.overhead

bench-forwarding: $(STAMP) ## tier-to-tier HTTP clients compared against a null tier
	$(PY) -m benchmarks.forwarding

test: $(STAMP) ## every test ring
	$(PY) -m pytest

test-unit: $(STAMP) ## the unit ring only
	$(PY) -m pytest tests/unit

check: $(STAMP) ## lint, format check and types
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services operators benchmarks tests

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## stop the tiers and remove what commands built (keeps .venv); safe to repeat
	@if [ -f $(STATE) ] && [ -x $(PY) ]; then $(PY) -m services down --state $(STATE); fi
	rm -rf .local models results .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## also remove the Python environment
	rm -rf $(VENV) *.egg-info
