# The two commands of the README: `make demo` (install + the main job) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint jvm

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

test: lint jvm
	$(BIN)/python -m pytest
