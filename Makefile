# The two commands of the README: `make demo` and `make test`. Both build .venv from the lock.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test airflow airflow-stop acceptance bench faults lock clean

# The development venv: the runtime lock (what the Docker image installs) and, on top, the
# development lock (the same pins plus pytest, playwright, duckdb, ruff...). pip refuses to go on
# if the two ever disagree. After editing requirements.lock: python3 scripts/split_lock.py.
$(STAMP): requirements.runtime.lock requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.runtime.lock -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bonewatch demo

test: $(STAMP)
	bash scripts/ensure-postgres
	bash scripts/ensure-chromium
	$(BIN)/ruff check dags plugins tests
	$(BIN)/pytest -n 2 --dist loadgroup

# Airflow 3 for real on this machine, no Docker: api-server, scheduler, dag-processor, triggerer
# (LocalExecutor) on the local PostgreSQL, an SMTP catcher, both DAGs unpaused; everything under
# data/airflow/. README "Run it on Airflow"; scripts/airflow-local says what it sets and why.
airflow: $(STAMP)
	bash scripts/ensure-postgres
	bash scripts/airflow-local start

airflow-stop:
	bash scripts/airflow-local stop

# Issue 4's acceptance scale: 2,000 synthetic patients over a year of nights (about 15 minutes).
acceptance: $(STAMP)
	COHORT_SCALE=full $(BIN)/pytest tests/integration/test_cohort.py -n 0 -s

# Issue 14: real processes killed at chosen points, SMTP and PostgreSQL failures, runs side by
# side, and a soak of 365 nights with random faults, against clean runs (about 40 minutes).
# Prints one line; `make test` runs a short version (tests/faults/test_faults.py).
faults: $(STAMP)
	bash scripts/ensure-postgres
	$(BIN)/python -m tests.faults --soak-nights 365 --workdir data/faults

bench: $(STAMP)
	bash scripts/ensure-postgres
	$(BIN)/python -m bench.run --attribute

# Re-pin every dependency (needs uv; run by a maintainer, not by the two commands), then derive
# the runtime lock from it (scripts/split_lock.py: the closure of requirements.runtime.in).
lock:
	uv pip compile requirements.in --python-version 3.11 -o requirements.lock --custom-compile-command "make lock"
	$(PYTHON) scripts/split_lock.py

clean:
	rm -rf $(VENV) .pytest_cache data
