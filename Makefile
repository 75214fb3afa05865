# Two entry points: `make serve` and `make test`. Each sets up .venv by itself on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/loraplex/v1/*.proto)
STUBS := $(PROTOS:.proto=_pb2.py)
ARGS ?=

.PHONY: serve test setup protos clean

setup: $(STAMP) $(STUBS)

# torch first and alone: the CPU build of 2.13.0 from local disk; every later range is satisfied by it.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

protos/%_pb2.py: protos/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. $<

protos: $(STUBS)

serve: setup
	$(VENV)/bin/loraplex serve --model default $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) protos/loraplex/v1/*_pb2*.py* models/default
