# Set-up and entry points. `make demo` and `make test` work on a fresh Debian machine with Python 3.11.
VENV ?= .venv
AUDIT_HOME ?= $(CURDIR)/home
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-packages label-studio demo test bench ui mlflow-ui

# Debian packages: the Fashion-MNIST demo data, headless Chromium for the UI screenshots, and PostgreSQL for
# the test of a Dagster instance kept there (needs root: run as root or with sudo available)
DEBIAN_PACKAGES := dataset-fashion-mnist chromium postgresql
system-packages:
	@if ! dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(DEBIAN_PACKAGES); \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: system-packages $(STAMP)

# Label Studio, in a venv of its own (its pins clash with the project's): the hand-check round trip's tests
# start its server; a checker's own Label Studio can be any install of the same major version.
LS_VENV ?= .ls-venv
LS_STAMP := $(LS_VENV)/.installed
$(LS_STAMP): requirements-label-studio.txt
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install -q -r requirements-label-studio.txt
	touch $(LS_STAMP)

label-studio: $(LS_STAMP)

# The demo in ./home is the project's DVC pipeline (dvc.yaml, params.yaml): `dvc repro` simulates, audits and
# records dvc.lock, so `dvc status` is clean afterwards and a later `dvc repro` does nothing until params.yaml
# or the home's settings change. Another AUDIT_HOME gets the same demo without the pipeline.
demo: install
ifeq ($(abspath $(AUDIT_HOME)),$(CURDIR)/home)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
else
	$(BIN)/vendor-audit demo --home $(AUDIT_HOME)
endif

# two workers, a test file each at a time (module fixtures stay in one process): most tests wait on
# subprocesses and servers, so the suite takes about 18 min instead of 22 on 2 cores
test: install label-studio
	LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

ui: install
	$(BIN)/vendor-audit ui --home $(AUDIT_HOME)

mlflow-ui: install
	$(BIN)/vendor-audit mlflow-ui --home $(AUDIT_HOME)
