# tierlab — the user's commands. `make help` lists them.
#
# Everything runs from a project virtualenv (.venv) that the first command builds by itself.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# the CPU build of torch; a plain `pip install torch` resolves the multi-GB CUDA build
TORCH ?= torch==2.13.0
DEMO := models/demo
DEPLOYMENT ?= $(DEMO)/deployment.yaml
comma := ,

.DEFAULT_GOAL := help
.PHONY: help venv models models-tiny models-list models-for-stack up down status fidelity fidelity-devices devices device-kit logs images profiles local demo bench chaos bench-resume bench-in-stack report recommend bench-loadgen bench-overhead bench-forwarding bench-soak bench-hostile bench-tiers bench-training bench-text-recipes swarm-nodes swarm-nodes-down test test-unit check fmt clean distclean

help: ## list the commands
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo "==> building the Python environment in $(VENV) (first run only)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on '$(TORCH)'
	$(PY) -m pip install --progress-bar on -e '.[operators,report,stack,devices,dev]'
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

# the stack: Docker by default (RUNTIME=local runs the tiers as processes, no Docker needed)
RUNTIME ?= docker
PROFILE ?= laptop
NETWORK ?= lan
SUBJECTS ?= fmnist-resnet,fmnist-resnext
STARTUP_MODELS ?= none
STACK := $(PY) -m services stack

models-for-stack: | $(STAMP)
	@for s in $(subst $(comma), ,$(SUBJECTS)); do \
	  if [ ! -d models/$$s ]; then echo "==> models/$$s missing: building it (make models builds every subject)"; \
	    $(PY) -m operators build --subject $$s || exit 1; fi; done

up: $(STAMP) models-for-stack ## start the stack: make up [PROFILE=laptop|paper|rpi4|phone] [NETWORK=lan|wifi|4g|wan|paper|none] [RUNTIME=docker|swarm|local]
	$(STACK) up --runtime $(RUNTIME) --profile $(PROFILE) --network $(NETWORK) --subjects $(SUBJECTS) --startup-models $(STARTUP_MODELS)

down: | $(STAMP) ## stop the stack; no container, network or volume is left
	$(STACK) down

status: | $(STAMP) ## tiers, cgroup limits seen from inside, link backends, Prometheus targets, URLs
	$(STACK) status

fidelity: | $(STAMP) ## measure every link's RTT and goodput against the network profile
	$(STACK) fidelity

devices: | $(STAMP) ## the measured devices (compose/devices) and their per-class ratios fitted against this host
	$(PY) -m services devices list
	$(PY) -m services devices fit

fidelity-devices: | $(STAMP) ## each device's leave-one-network-out error against its published times; last line is JSON
	$(PY) -m services devices fidelity

device-kit: | $(STAMP) ## write the calibration kit for a device you own into device-kit/ (see docs/device-speed.md)
	$(PY) -m services devices kit device-kit

logs: | $(STAMP) ## the last log lines of every service
	$(STACK) logs

swarm-nodes: $(STAMP) ## a 3-node Docker Swarm of Docker-in-Docker nodes on this machine (then DOCKER_HOST=… make up RUNTIME=swarm)
	$(STACK) nodes up --count $(or $(NODES),3) $(if $(filter no,$(JOIN)),--no-join)

swarm-nodes-down: | $(STAMP) ## remove the Docker-in-Docker swarm nodes, their volumes and network
	$(STACK) nodes down

images: $(STAMP) ## build (or pull) the tier, Prometheus and Grafana images; ARCH=arm64: the tier image for a Pi
	$(STACK) images $(if $(ARCH),--arch $(ARCH))

profiles: | $(STAMP) ## list the resource and network profiles in compose/
	$(STACK) profiles

local: $(STAMP) $(DEPLOYMENT) ## run the three demo tiers in the foreground until Ctrl-C (no Docker)
	$(PY) -m services local --deployment $(DEPLOYMENT)

SPEC ?= default
P95_MS ?= 20
MAX_DROP ?= 0.01

bench: $(STAMP) ## run an experiment on the stack `make up` started: make bench [SPEC=default|quick|FILE]
	$(PY) -m loadgen run --spec $(SPEC)

chaos: $(STAMP) ## kill, pause, cut and squeeze tiers under load (loadgen/specs/chaos.yaml): the fault table
	$(PY) -m loadgen run --spec chaos

bench-resume: $(STAMP) ## continue the last interrupted experiment where it stopped
	$(PY) -m loadgen run --resume latest

bench-in-stack: $(STAMP) ## the same experiment from a loadgen container inside the Docker stack
	$(STACK) loadgen --spec $(SPEC)
	$(PY) -m loadgen report latest --table

report: | $(STAMP) ## remake summary.json and report.html of the latest experiment; print its ranking
	$(PY) -m loadgen report latest --table

recommend: | $(STAMP) ## which strategy for a budget: make recommend P95_MS=20 MAX_DROP=0.01
	$(PY) -m loadgen recommend latest --p95-ms $(P95_MS) --max-accuracy-drop $(MAX_DROP)

bench-loadgen: $(STAMP) ## P4: the loadgen's capacity and overhead against a null tier; last line is JSON
	$(PY) -m benchmarks.loadgen

bench-overhead: $(STAMP) ## P1 hop tax, P2 codec, P3 serving throughput; last line is JSON
	$(PY) -m benchmarks.overhead

bench-forwarding: $(STAMP) ## tier-to-tier HTTP clients compared against a null tier
	$(PY) -m benchmarks.forwarding

bench-soak: $(STAMP) ## 10 min at 80 % of measured capacity on the stack make up started: RSS slope, errors, p99 drift; last line is JSON
	$(PY) -m benchmarks.soak

bench-hostile: $(STAMP) ## 200 hostile connections against the mobile tier (with the stack up): memory, legitimate success and p99; last line is JSON
	$(PY) -m benchmarks.hostile

bench-tiers: $(STAMP) ## the profile's tier order in compute time, on the stack make up started; last line is JSON
	$(PY) -m benchmarks.tier_order

bench-training: $(STAMP) ## training items/s of the teachers by layout and precision (bfloat16); last line is JSON
	$(PY) -m benchmarks.training

bench-text-recipes: $(STAMP) ## fortunes teacher recipes by 5-fold cross-validation on the training split (~1 h); last line is JSON
	$(PY) -m benchmarks.text_recipes

test: $(STAMP) ## every test ring
	$(PY) -m pytest

test-unit: $(STAMP) ## the unit ring only
	$(PY) -m pytest tests/unit

check: $(STAMP) ## lint, format check, types and the import rules between tierlab's parts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services operators loadgen benchmarks tests
	$(VENV)/bin/lint-imports --no-cache

fmt: $(STAMP) ## format the code
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## stop the stack, remove its images and what commands built (keeps .venv); safe to repeat
	@if [ -x $(PY) ]; then $(STACK) clean --all; fi
	rm -rf .local models results .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## also remove the Python environment
	rm -rf $(VENV) *.egg-info
