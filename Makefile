# Two commands set everything up: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint format bench bench-quick clean install system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Real brokers for the bridge tests and a browser for the status page test (Debian
# packages); root or sudo installs them once.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || ls /usr/sbin/mosquitto >/dev/null 2>&1 || { \
		echo "installing mosquitto (Debian package) for the MQTT bridge tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto; }
	@test -x .cache/npm/node_modules/.bin/azurite-blob || command -v azurite-blob >/dev/null 2>&1 || { \
		echo "installing azurite (npm) into .cache/npm for the object-storage tests"; \
		command -v npm >/dev/null 2>&1 || { \
			SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
			$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq nodejs npm; }; \
		npm install --prefix .cache/npm --no-audit --no-fund azurite; }
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium (Debian package) for the status page test"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }
	@{ command -v nginx || ls /usr/sbin/nginx; } >/dev/null 2>&1 && command -v envsubst >/dev/null 2>&1 \
		&& command -v systemd-analyze >/dev/null 2>&1 || { \
		echo "installing nginx, gettext-base, systemd (Debian packages) for the deployment tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq nginx gettext-base systemd; }

install: $(STAMP)

run: $(STAMP)
	$(BIN)/lakehouse up

test: $(STAMP) system-deps
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every benchmark section (bench/run_all.py): tables on stdout, merged JSON in
# bench/results/latest.json. The bridges section needs mosquitto (`make system-deps`).
# Fault injection and fuzzing in full: 60 random SIGKILLs, 4 restarts of each broker,
# >= 1200 schemathesis cases, 500 examples per parser property (`make test` runs them short).
reliability: $(STAMP) system-deps
	LAKEHOUSE_RELIABILITY_KILLS=60 LAKEHOUSE_RELIABILITY_RESTARTS=4 \
	LAKEHOUSE_RELIABILITY_CASES=1200 LAKEHOUSE_RELIABILITY_EXAMPLES=500 \
	LAKEHOUSE_RELIABILITY_STORAGE_RESTARTS=2 LAKEHOUSE_RELIABILITY_OUTAGE_S=12 \
	$(BIN)/pytest -q -m reliability tests/reliability

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run_all.py --quick

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
