# Every target creates and uses .venv itself; nothing needs installing by hand.
SHELL := /bin/bash
PYTHON ?= python3.11
# The venv's Python must be readable by every user: supervisord runs from it
# and keeps importing after it drops to a deployment's user. A Python under
# /root (pyenv's) is not, so the system's own is preferred where it exists.
VENV_PYTHON ?= $(or $(wildcard /usr/bin/python3.11),$(PYTHON))
UV_VERSION := 0.9.30
UV := .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_CACHE_DIR := $(CURDIR)/.cache/uv
export UV_PYTHON_DOWNLOADS := never

.PHONY: venv browser test lint demo demo-down bench clean

$(UV):
	$(PYTHON) -m pip install -q --disable-pip-version-check --target .tools uv==$(UV_VERSION)

$(VENV)/.synced: requirements-dev.lock | $(UV)
	[ -x $(BIN)/python ] || $(UV) venv -q -p $(VENV_PYTHON) $(VENV)
	$(UV) pip sync -q -p $(BIN)/python requirements-dev.lock
	touch $@

venv: $(VENV)/.synced

# The fleet page's tests (and its bench rows) drive Debian's Chromium through
# chromedriver: installed when missing, by apt-get as root.
CHROMIUM_DEBS := chromium chromium-driver
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(CHROMIUM_DEBS); \
		else \
			echo "the page tests need Debian's $(CHROMIUM_DEBS): sudo apt-get install $(CHROMIUM_DEBS)" >&2; exit 1; \
		fi; \
	fi

# Unit and functional tests need no daemons: four at a time. Integration
# modules two at a time, each keeping its tests on one worker (their daemons start once).
test: venv browser
	$(BIN)/pytest -n 4 tests/unit tests/functional $(PYTEST_ARGS)
	$(BIN)/pytest -n 2 --dist loadscope tests/integration $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint -s .
	find salt pillar -name '*.sls' -print0 | xargs -0 $(BIN)/salt-lint

demo: venv
	$(BIN)/python -m localfleet up

demo-down: venv
	$(BIN)/python -m localfleet down

bench: venv browser
	$(BIN)/python -m bench $(if $(QUICK),--quick)

clean: demo-down
	rm -rf $(VENV) .tools .demo .bench
