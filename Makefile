# One command sets up and runs the main job; one sets up and runs the tests.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.installed-browser
TORCH   := torch==2.13.0

.PHONY: setup run demo study test test-all test-fast bench browser-setup browser-check clean

setup: $(STAMP)

# Idempotent: the stamp is rebuilt only when the dependency list changes.
$(STAMP): pyproject.toml $(wildcard scripts/setup_*.sh)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[all]'
	bash scripts/setup_assets.sh $(BIN)/python
	touch $(STAMP)

run: setup
	$(BIN)/python -m ntps_nb run

demo: setup
	$(BIN)/python -m ntps_nb demo

study: setup
	$(BIN)/python -m ntps_nb study run studies/default.toml

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q tests/core

# The explorer notebook in JupyterLab in Debian's chromium (apt-get install -y --no-install-recommends
# chromium; .ci/run installs it): all cells run without error, and moving the layer slider redraws
# the figure. Screenshots, the executed notebook and result.json in out/browser/.
browser-setup: $(BROWSER_STAMP)

$(BROWSER_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[browser]'
	touch $(BROWSER_STAMP)

browser-check: browser-setup
	$(BIN)/python scripts/browser_check.py --results data/results/default-richardson --smoke --out out/browser

bench: setup
	$(BIN)/python benchmarks/bench_sweep.py

clean:
	rm -rf $(VENV)
