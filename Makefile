# The two commands of the README: `make demo` (install + the main job) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint jvm docker browser clients

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/flowline demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Spark (-P spark=local[N], its tests) needs a Java 17+ runtime; Debian's, if none is on PATH.
jvm:
	@command -v java >/dev/null 2>&1 || { apt-get update -qq && \
		apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless; }

# The docker backend and its tests: Debian's docker.io and debootstrap, a running dockerd
# and the offline base image (no registry is reachable to pull python:3.11-slim).
docker: $(BIN)/.installed
	bash scripts/docker-up.sh $(BIN)

# The Swagger UI test (tests/test_swagger_ui.py) drives Debian's headless chromium through
# Playwright; Playwright's own browser download is never used.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		apt-get install -y -qq --no-install-recommends chromium; }

# The real Open Inference Protocol clients (tritonclient, KServe) that tests/test_v2_protocol.py
# drives, in a venv of their own: they need protobuf < 7, flowline pins protobuf 7.
CLIENTS ?= .venv-clients
$(CLIENTS)/.installed: tests/clients/requirements.txt
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install --quiet -r tests/clients/requirements.txt
	touch $@

clients: $(CLIENTS)/.installed

test: lint jvm docker browser clients
	FLOWLINE_BASE_IMAGE=$${FLOWLINE_BASE_IMAGE:-flowline-base:bookworm} $(BIN)/python -m pytest
