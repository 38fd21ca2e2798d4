# The project's verbs. Every target bootstraps .venv first, so a fresh clone needs nothing else.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PROTOS := $(shell find protos -name '*.proto' | sort)
# Where googleapis-common-protos keeps google/api/*.proto inside the virtualenv.
GOOGLEAPIS = $(shell $(PY) -c 'import pathlib, google.api.annotations_pb2 as m; print(pathlib.Path(m.__file__).parents[2])')

.PHONY: help venv gen check lint typecheck proto-lint proto-breaking gen-drift test run gateway migrate load seed-large bench bench-scale engine-venv engine-run demo-bksops clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	scripts/install-mysqlclient-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed  ## create .venv and install the project with its dev tools

gen: $(VENV)/.installed  ## regenerate generated/ from protos/
	rm -rf generated/bksops
	mkdir -p generated
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) \
	  --python_out=generated --pyi_out=generated --grpc_python_out=generated $(PROTOS)

gen-drift: $(VENV)/.installed  ## fail when generated/ is not what protos/ generates
	rm -rf .build/gen && mkdir -p .build/gen
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLEAPIS) \
	  --python_out=.build/gen --pyi_out=.build/gen --grpc_python_out=.build/gen $(PROTOS)
	diff -r -x __pycache__ .build/gen/bksops generated/bksops \
	  || { echo "generated/ is out of date with protos/: run 'make gen' and commit"; exit 1; }

.build/googleapis/google/rpc/status.proto: $(VENV)/.installed
	mkdir -p .build/googleapis/google/api .build/googleapis/google/rpc
	cp $(GOOGLEAPIS)/google/api/annotations.proto $(GOOGLEAPIS)/google/api/http.proto .build/googleapis/google/api/
	cp $(GOOGLEAPIS)/google/rpc/status.proto .build/googleapis/google/rpc/

proto-lint: .build/googleapis/google/rpc/status.proto  ## buf lint (STANDARD + COMMENTS)
	$(BIN)/buf lint

proto-breaking: $(VENV)/.installed  ## buf breaking (FILE) against the main branch
	scripts/buf-breaking.sh main

lint: $(VENV)/.installed  ## ruff format --check and ruff check
	$(BIN)/ruff format --check server tests bench
	$(BIN)/ruff check server tests bench

typecheck: $(VENV)/.installed  ## mypy
	$(BIN)/mypy

check: lint typecheck proto-lint proto-breaking gen-drift  ## everything static: ruff, mypy, buf, generated-code drift

test: $(VENV)/.installed  ## run the whole suite
	$(BIN)/pytest $(PYTEST_ARGS)

run: $(VENV)/.installed  ## serve gRPC and HTTP/JSON on the embedded database, with demo data on first run
	$(PY) -m server serve --demo

gateway: $(VENV)/.installed  ## serve only the HTTP/JSON shim, calling gRPC at TASKNODE_GRPC_TARGET
	$(PY) -m server gateway

migrate: $(VENV)/.installed  ## create or upgrade the schema of TASKNODE_DATABASE_URL
	$(PY) -m server migrate

load: $(VENV)/.installed  ## load a JSON file into the database: make load FILE=path.json
	$(PY) -m server load $(FILE)

seed-large: $(VENV)/.installed  ## generate TASKS tasks (~90 nodes each) into an empty TASKNODE_DATABASE_URL (default var/scale.db)
	TASKNODE_DATABASE_URL='$(or $(TASKNODE_DATABASE_URL),sqlite:///var/scale.db)' \
	  $(PY) -m server.db.scale --tasks $(or $(TASKS),1000)

bench: $(VENV)/.installed  ## the service against its stack's ceiling: h2load and wrk, ~12 min (BENCH_SECONDS=10)
	command -v h2load >/dev/null && command -v wrk >/dev/null \
	  || { echo "installing h2load and wrk (Debian: nghttp2-client, wrk)"; \
	       $$(command -v sudo) apt-get install -y -q nghttp2-client wrk; }
	$(PY) -m bench.run --seconds $(or $(BENCH_SECONDS),10)

bench-scale: $(VENV)/.installed  ## median GetTaskNodeDetail latency at 10^3 vs 10^6 nodes, SQLite and PostgreSQL
	$(PY) -m bench.scale $(BENCH_ARGS)

engine-venv: $(VENV)/.installed  ## build the real bk-sops engine's own Python 3.11 virtualenv (.build/engine-venv, ~35 s once)
	$(PY) -m tests.engine.harness

engine-run: $(VENV)/.installed  ## run real pipelines with the real engine into an empty database (URL=..., default a fresh var/engine.db)
	mkdir -p var
	$(if $(URL),,rm -f var/engine.db)
	$(PY) -m tests.engine.harness '$(or $(URL),sqlite:///var/engine.db)'

demo-bksops: $(VENV)/.installed  ## real pipelines run by the real engine into var/demo-bksops/engine.db, then served from it (prints grpcurl and curl commands)
	$(PY) -m tests.engine.demo

clean:  ## remove the virtualenv, caches and the embedded database
	rm -rf $(VENV) .build var .pytest_cache .mypy_cache .ruff_cache
