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

.PHONY: install lock proto test lint typecheck bench sim demo clean cluster stop status logs \
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

# The environment is installed from requirements.lock: every package (pip and the build
# tools too) at an exact version with its hashes, so a clone builds the same environment
# next year. The project itself goes in editable, with no dependency of its own choosing.
# `make lock` writes the lock again from pyproject.toml (after changing a dependency
# there), and requirements-runtime.lock, the installed package's own dependencies, which
# the container image installs; `make lock UPGRADE=1` moves every pin to the newest
# release.
$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $@

LOCK_ARGS = --quiet --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
	--no-emit-find-links $(if $(UPGRADE),--upgrade,)

# Not `install`: after a dependency is added to pyproject.toml the old lock cannot
# install it (pip check fails), so lock needs only a venv holding pip-tools.
lock:
	@test -x $(VENV)/bin/pip-compile || { $(PYTHON) -m venv $(VENV) && \
	  $(VENV)/bin/pip install --quiet pip-tools; }
	$(VENV)/bin/pip-compile $(LOCK_ARGS) --extra dev --output-file requirements.lock pyproject.toml
	$(VENV)/bin/pip-compile $(LOCK_ARGS) --constraint requirements.lock \
	  --output-file requirements-runtime.lock pyproject.toml

$(GEN_STAMP): $(PROTOS) $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	@touch $@

proto: $(GEN_STAMP)

test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy exchange agents bench
	$(VENV)/bin/lint-imports

bench: install
	$(PY) -m bench $(BENCH_ARGS)

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
