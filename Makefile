# CLM: `make run` starts the platform locally, `make test` runs the whole test suite.
# Both install what they need into .venv and start a real Kafka (KRaft) and PostgreSQL unless
# KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point at existing ones.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests isolate themselves (topic prefix, schema per test), so they run in parallel.
PYTEST_ARGS ?= -n 3 --dist loadscope -q

.PHONY: help venv lock run infra test lint fmt demo clean bench-ingest bench-segmenter bench-journeys bench-notifier \
	bench-lifecycle bench-recommendations bench-e2e

help:
	@echo "make run    start Kafka, PostgreSQL, an SMTP sink and the four services (Ctrl-C stops)"
	@echo "make test   run the whole test suite against a fresh local Kafka + PostgreSQL"
	@echo "make lint   ruff + mypy --strict"
	@echo "make lock   re-pin constraints.txt after changing pyproject.toml's dependencies"
	@echo "make demo   seed journeys/templates/segments into a running platform and stream customers"
	@echo "make infra  Kafka + PostgreSQL only"
	@echo "make bench-<name>  benchmarks (see bench/README.md)"

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON))"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Pins every package (transitive ones too) to what a fresh install of pyproject.toml gets today.
lock:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required ($(PYTHON))"; exit 1; }
	rm -rf .cache/lock-venv && $(PYTHON) -m venv .cache/lock-venv
	.cache/lock-venv/bin/python -m pip install --quiet --upgrade pip
	.cache/lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; .cache/lock-venv/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .cache/lock-venv

run: $(STAMP)
	$(PY) -m deploy.local.stack run

# Seeds a running platform (`make run` in another terminal) and streams simulated customers.
demo: $(STAMP)
	$(PY) -m deploy.demo $(DEMO_ARGS)

infra: $(STAMP)
	$(PY) -m deploy.local.stack infra

test: $(STAMP)
	$(PY) -m deploy.local.stack test -- $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shared services deploy bench

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-ingest: $(STAMP)
	$(PY) -m deploy.local.stack bench bench.ingest

bench-segmenter: $(STAMP)
	$(PY) -m deploy.local.stack bench bench.segmenter

bench-journeys: $(STAMP)
	$(PY) -m deploy.local.stack bench bench.journeys

bench-notifier: $(STAMP)
	$(PY) -m deploy.local.stack bench bench.notifier

bench-lifecycle: $(STAMP)
	$(PY) -m deploy.local.stack bench bench.lifecycle

bench-recommendations: $(STAMP)
	$(PY) -m deploy.local.stack bench bench.recommendations

bench-e2e: $(STAMP)
	$(PY) -m deploy.local.stack bench bench.e2e

clean:
	rm -rf .cache/stacks var
