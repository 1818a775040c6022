# Two entry points (see README): `make run` serves conf/scriptlb.conf, `make test` runs the suite.
# Both create .venv and install the project into it first, so a fresh machine needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-unit lint bench bench-stream bench-tls install

# `run` installs what running needs; `install` (and so test, lint) adds the test tools.
$(BIN)/scriptlb: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(BIN)/scriptlb

$(VENV)/.test-tools: $(BIN)/scriptlb
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(VENV)/.test-tools

install: $(VENV)/.test-tools

# conf/scriptlb.conf says `daemon off;` itself (nginx refuses the same directive twice, so no
# -g 'daemon off;' here); scriptlb creates logs/ (its pid file) when it is missing.
run: $(BIN)/scriptlb
	$(BIN)/scriptlb -p . -c conf/scriptlb.conf

test: install
	bash scripts/install-test-tools
	$(BIN)/ruff check scriptlb tests bench
	$(BIN)/mypy
	$(BIN)/pytest

# the pure tests only (seconds): docs/testing.md
test-unit: install
	$(BIN)/pytest -m unit

lint: install
	$(BIN)/ruff check scriptlb tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py $(ARGS)
	$(BIN)/python bench/stream_bench.py --seconds 2 --out bench/results/stream

# TCP (stream block) beside nginx's stream module and HAProxy mode tcp: bulk MB/s, sessions/s
bench-stream: install
	$(BIN)/python bench/stream_bench.py $(ARGS)

# HTTPS keep-alive and handshake rate through nginx and scriptlb (needs nginx, wrk, trustme)
bench-tls: install
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python bench/tls_bench.py $(ARGS)
