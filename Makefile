# The project's commands. Every target builds the environment first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/exchange/v1/*.proto)
GEN_STAMP := exchange/v1/.generated
SEEDS ?= 1000
SEED ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install proto test lint typecheck bench sim demo clean cluster stop status logs \
	console console-assets

install: $(STAMP) $(GEN_STAMP) console-assets

# The console's front-end libraries, pinned in package-lock.json, installed from the npm
# registry at build time and served by the console itself (no asset from another site at
# run time). Without npm the console works but its case graph is not drawn.
CYTOSCAPE := exchange/console/static/vendor/cytoscape.min.js
console-assets: $(CYTOSCAPE)

$(CYTOSCAPE): package.json package-lock.json
	@if ! command -v npm >/dev/null; then \
	  echo "npm not found: the console's case graph (Cytoscape.js) is not installed"; \
	elif npm ci --no-audit --no-fund --silent; then \
	  mkdir -p $(@D) && cp node_modules/cytoscape/dist/cytoscape.min.js $@; \
	else echo "npm ci failed: the console's case graph (Cytoscape.js) is not installed"; fi

# The local cluster with sample data, and a console for a tax analyst and a tax supervisor.
console: install
	bash scripts/console.sh

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	@touch $@

$(GEN_STAMP): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	@touch $@

proto: $(GEN_STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy exchange agents

bench: install
	$(PY) -m exchange.bench $(BENCH_ARGS)

sim: install
	$(PY) -m tests.sim $(if $(SEED),--seed $(SEED) --verbose,--seeds $(SEEDS)) $(if $(STEPS),--steps $(STEPS),)

demo: install
	bash scripts/demo.sh

cluster: install
	bash scripts/cluster.sh start

status: install
	bash scripts/cluster.sh status

logs:
	bash scripts/cluster.sh logs

stop:
	bash scripts/cluster.sh stop

clean:
	-bash scripts/cluster.sh stop
	rm -rf deploy/local var
	rm -rf $(VENV) $(GEN_STAMP) exchange/v1/*_pb2*.py exchange/v1/*_pb2*.pyi build *.egg-info var
