# Switchboard: `make run` serves it locally on embedded defaults; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run test lint format clean chaos bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# One ASGI process plus a Celery worker with beat on the filesystem broker; Ctrl-C stops both.
run: install
	mkdir -p var/celery/queue var/celery/processed
	$(BIN)/python manage.py migrate --no-input
	$(BIN)/python manage.py collectstatic --no-input --verbosity 0
	$(BIN)/python manage.py load_catalog catalog.example.yaml
	@echo "Demo API key (shown once): $$($(BIN)/python manage.py setup_demo)"
	@echo "Gateway: http://$(HOST):$(PORT)/v1   Admin: http://$(HOST):$(PORT)/admin/"
	@trap 'kill 0' INT TERM EXIT; \
	$(BIN)/celery -A portal worker --beat --loglevel=warning --concurrency=1 & \
	$(BIN)/uvicorn portal.asgi:application --host $(HOST) --port $(PORT) --no-access-log

# Starts throwaway PostgreSQL and Redis unless DATABASE_URL / REDIS_URL are given.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Faults under load (kill -9 a gateway, kill a Celery worker, restart Redis, stop PostgreSQL),
# then sweep and reconcile; about a minute a fault. Not part of `make test`.
# One fault: make chaos CHAOS_ARGS="--fault restart-redis --seconds 30"
chaos: install
	$(BIN)/python -m tests.chaos.run $(CHAOS_ARGS)

# Switchboard vs a direct call, a bare proxy and LiteLLM on this machine (bench/RESULTS.md).
# BENCH_ARGS=--quick for a short smoke run.
bench: install
	$(BIN)/python -m bench.run $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
