# Every target creates and uses .venv itself; nothing needs installing by hand.
SHELL := /bin/bash
PYTHON ?= python3.11
# The venv's Python must be readable by every user: supervisord runs from it
# and keeps importing after it drops to a deployment's user. A Python under
# /root (pyenv's) is not, so the system's own is preferred where it exists.
VENV_PYTHON ?= $(or $(wildcard /usr/bin/python3.11),$(PYTHON))
UV_VERSION := 0.9.30
UV ?= .tools/bin/uv
VENV := .venv
BIN := $(VENV)/bin
export UV_CACHE_DIR ?= $(CURDIR)/.cache/uv
export UV_PYTHON_DOWNLOADS := never

# Debian packages the tests drive: ss (iproute2) shows what the demo listens on,
# ansible-inventory (ansible-core) reads the fleet through the inventory script,
# rabbitmq-server is the broker of the Celery tests and of the demo (a private
# node: localfleet/rabbitmq.py), chromium and chromium-driver show the fleet page.
DEBIAN_PACKAGES := iproute2:/usr/bin/ss ansible-core:/usr/bin/ansible-inventory \
	rabbitmq-server:/usr/lib/rabbitmq/bin/rabbitmq-server \
	chromium:/usr/bin/chromium chromium-driver:/usr/bin/chromedriver

.PHONY: venv system-packages test lint demo demo-down bench clean

$(UV):
	$(PYTHON) -m pip install -q --disable-pip-version-check --target .tools uv==$(UV_VERSION)

$(VENV)/.synced: requirements-dev.lock | $(UV)
	[ -x $(BIN)/python ] || $(UV) venv -q -p $(VENV_PYTHON) $(VENV)
	$(UV) pip sync -q -p $(BIN)/python requirements-dev.lock
	touch $@

venv: $(VENV)/.synced

# What is missing is installed when root runs this on Debian; anyone else is told the command.
system-packages:
	@missing=""; for entry in $(DEBIAN_PACKAGES); do \
		[ -x "$${entry#*:}" ] || missing="$$missing $${entry%%:*}"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages the tests and the demo need:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else \
		echo "the tests and the demo need Debian packages that are missing; run: sudo apt-get install$$missing" >&2; exit 1; \
	fi

# Unit and functional tests need no daemons: four at a time. Integration
# modules three at a time (they mostly wait on daemons and workers), each
# keeping its tests on one worker (their daemons start once).
test: venv system-packages
	$(BIN)/pytest -n 4 tests/unit tests/functional $(PYTEST_ARGS)
	$(BIN)/pytest -n 4 --dist loadscope tests/integration $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint -s .
	find salt pillar -name '*.sls' -print0 | xargs -0 $(BIN)/salt-lint

demo: venv system-packages
	$(BIN)/python -m localfleet up

demo-down: venv
	$(BIN)/python -m localfleet down

bench: venv system-packages
	$(BIN)/python -m bench $(if $(QUICK),--quick)

clean: demo-down
	rm -rf $(VENV) .tools .demo .bench
