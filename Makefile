# Two set-up commands for a fresh machine: `make run` and `make test`.
# Each creates .venv and installs what it needs on first use (and again when pyproject changes).
# llama-cpp-python builds from source on first install (about 6 minutes on 2 cores; the wheel
# is then cached in ~/.cache/milton/wheels, keyed on its build flags). MILTON_LLAMA_CPU picks
# the instruction-set tier (auto, avx512, avx2, sse42, generic): see scripts/llama_wheel.py.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run lint test bench docs systemd-tools browser-tools clean

$(STAMP): pyproject.toml scripts/llama_wheel.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# llama-cpp-python built portably (no -march=native, no AMX), wheel cached per set of flags
	$(PYTHON) scripts/llama_wheel.py $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m milton.models.convert   # llama.cpp's converters, from the same sdist
	# last: the packaged model must generate in a child process, or the install fails here
	$(BIN)/python -m milton.models.smoke --install
	touch $(STAMP)

## Installs, and re-checks the llama.cpp build on every call (under a second when it is the one
## recorded; a changed MILTON_LLAMA_CPU or a removed .venv/llama-build.json rebuilds and re-tests).
install: $(STAMP)
	@$(PYTHON) scripts/llama_wheel.py $(BIN)/python --smoke

## Main job on the embedded defaults: take a snapshot, train, then serve on 127.0.0.1:8000.
run: install
	$(BIN)/milton ingest processes
	$(BIN)/milton train-anomaly
	exec $(BIN)/milton serve

## The dependency rule (import-linter contracts in pyproject.toml: layers, no cycles, ops only
## under the CLI; no private or string imports), lint (ruff), and core's types (mypy).
## `make test` runs it first.
lint: install
	$(BIN)/lint-imports
	$(BIN)/python scripts/check_imports.py milton
	$(BIN)/ruff check milton tests benchmarks scripts
	$(BIN)/mypy

## The whole suite, after lint (systemd's own tools verify the units and Debian's chromium
## renders the dashboard, so make sure they exist).
test: lint systemd-tools browser-tools
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m benchmarks

## Regenerate docs/cli.md and config.toml from the code (a test fails when they drift).
docs: install
	$(BIN)/python -c "from milton.cli.docs import *; \
	  open('docs/cli.md', 'w').write(render_cli_reference()); \
	  open('config.toml', 'w').write(render_default_config())"

# $(call debian-tool,COMMAND,PACKAGE,TESTS): install PACKAGE from Debian when COMMAND is
# missing and we are root; otherwise a warning (those TESTS skip, and fail under CI=true).
define debian-tool
	@command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(2) (for $(1), $(3)) ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "warning: $(1) not found; $(3) will be skipped (they fail under CI)"; \
	  fi; }
endef

systemd-tools:
	$(call debian-tool,systemd-analyze,systemd,unit verification tests)

## Playwright drives the system's chromium (no browser download): Debian's package.
browser-tools:
	$(call debian-tool,chromium,chromium,the dashboard's browser tests)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
