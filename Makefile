# tabrec: `make run` trains the demo models, `make test` runs the test suite.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: install run test test-slow test-all lint bench clean airflow-venv

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (Python 3.11 is required)" >&2; exit 2; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipelines.demo --out $(DEMO)

# Default suite (a few minutes): every test not marked slow.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The optional `spark` extra (pyspark, ~450 MB) that tests/test_spark.py needs; Spark also needs Java 17+.
SPARK_STAMP := $(VENV)/.installed-spark
$(SPARK_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,spark]'
	@touch $(SPARK_STAMP)

# Slower end-to-end tests (real MLflow runs, subprocess servers, Spark); CI runs these after `make test`.
test-slow: $(SPARK_STAMP)
	$(BIN)/python -m pytest -q -m slow; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests"; exit 0; fi; exit $$rc

test-all: test test-slow

# The Airflow 3 venv that tests/test_airflow_dag.py runs the DAG in (cached outside the repo; the
# test builds it on demand too). Prints its path and how long the install took.
airflow-venv: $(STAMP)
	$(BIN)/python tests/airflow_env.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(DEMO) mlruns mlartifacts mlflow.db .pytest_cache
