# SLM Studio. `make run` installs everything and starts the app; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
WEB_HOST ?= 127.0.0.1
WEB_PORT ?= 8000
export WEB_HOST WEB_PORT
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-test system-test-deps run migrate worker web test test-fast test-abuse test-browser lint migrations-check ci clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Stamps re-run pip only when a requirements file changes.
$(VENV)/.base: requirements/base.txt | $(PY)
	$(PIP) install -r requirements/base.txt
	touch $@

# torch==2.13.0 is the CPU build on this disk; llama-cpp-python compiles once (about 7 minutes
# on 2 cores), then pip's cache reuses the wheel.
# One resolve over every file a stamp needs, so pip weighs all pins together (chromadb's
# kubernetes client against celery's python-dateutil pin, for one).
$(VENV)/.ml: requirements/ml.txt $(VENV)/.base
	$(PIP) install -r requirements/base.txt -r requirements/ml.txt
	touch $@

$(VENV)/.test: requirements/test.txt $(VENV)/.ml
	$(PIP) install -r requirements/base.txt -r requirements/ml.txt -r requirements/test.txt
	touch $@

install: $(VENV)/.base $(VENV)/.ml

install-test: $(VENV)/.base $(VENV)/.ml $(VENV)/.test

# Real services for the tests come from Debian: Redis and PostgreSQL servers the tests start
# themselves on free ports, and Chromium for the browser tests (driven by Playwright with
# executable_path, never downloaded).
system-test-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "Installing$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

migrate: $(VENV)/.base
	$(PY) manage.py migrate --noinput

run: install migrate
	@$(PY) manage.py preparemodels >/dev/null && echo "Bundled models: ready."
	@$(PY) manage.py ensureadmin | $(PY) -c 'import json,sys; d=json.load(sys.stdin); print("Admin user created: %s / password: %s  (shown once; change it in the admin)" % (d["username"], d["password"]) if d["created"] else "Admin user: already exists.")'
	@echo "SLM Studio is starting: open http://$(WEB_HOST):$(WEB_PORT)/"
	$(VENV)/bin/honcho start --env /dev/null

web: install migrate
	$(VENV)/bin/honcho start --env /dev/null web

worker: install
	$(VENV)/bin/honcho start --env /dev/null worker

test: install-test system-test-deps
	$(PY) -m pytest

test-fast: install-test
	$(PY) -m pytest --ignore=tests/browser --ignore=tests/e2e

test-abuse: install-test system-test-deps
	$(PY) -m pytest -m abuse

test-browser: install-test system-test-deps
	$(PY) -m pytest tests/browser

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

migrations-check: $(VENV)/.base
	$(PY) manage.py makemigrations --check --dry-run

ci: test

clean:
	rm -rf $(VENV)
