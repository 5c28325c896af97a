PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-faults image-test bench check lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "python3 -m venv failed; on Debian/Ubuntu: apt-get install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m proxy --config config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Long fault scenarios (kill -9 loops, outages, disk full); .ci/run runs them too.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Builds the image from the Dockerfile with podman, runs and probes it (root; apt-get installs
# podman, runc and mmdebstrap when missing). The Debian base is cached in .cache/image-test/.
image-test: $(STAMP)
	bash deploy/image-test.sh

# Issue 9's targets as ratios against baselines of the same run (a few minutes; loopback only;
# installs wrk from Debian's packages when missing). `make bench BENCH_ARGS=--quick`: under a minute.
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench.load $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache data
