# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the pinned stack into it (constraints.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test test-unit lint install browser orthanc monailabel-client bench docs-pictures clean

install: $(STAMP) browser orthanc

# Debian chromium for the web page's browser test (Playwright drives /usr/bin/chromium; no browser download).
# Where apt-get is missing or not allowed this only warns, and tests/integration/test_web_page.py fails saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium (apt-get failed); the browser test will fail"

# Debian Orthanc + its DICOMweb plugin for the PACS tests (tests/integration/test_pacs_orthanc.py starts one on loopback).
# Where apt-get is missing or not allowed this only warns, and the PACS tests fail saying so.
orthanc:
	@if command -v Orthanc >/dev/null 2>&1 && dpkg -s orthanc-dicomweb >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "warning: no apt-get to install orthanc + orthanc-dicomweb; the PACS tests will fail"; \
	elif ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb \
	        >/dev/null); then \
	  echo "warning: could not install orthanc + orthanc-dicomweb (apt-get failed); the PACS tests will fail"; fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: its CPU/CUDA wheel comes from the local index here; sam2 and deepspeed build against it.
	$(PIP) torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 DS_BUILD_OPS=0 $(PIP) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rau demo --out runs/demo

# MONAI Label's own client (monailabel.client.MONAILabelClient) for tests/integration/test_monailabel.py, in a venv of
# its own: the monailabel package's dependencies (MONAI, its torch and sam2 pins) clash with the stack, and its client
# needs only requests. Exactly the pins of requirements-monailabel.txt, without dependency resolution.
ML_VENV  := .venv-monailabel
ML_STAMP := $(ML_VENV)/.installed-stamp

monailabel-client: $(ML_STAMP)

$(ML_STAMP): requirements-monailabel.txt
	test -x $(ML_VENV)/bin/python || $(PYTHON) -m venv $(ML_VENV)
	$(ML_VENV)/bin/python -m pip install --disable-pip-version-check -q --no-deps -r requirements-monailabel.txt
	touch $(ML_STAMP)

# The whole suite: lint and layer contracts first, then every test (unit + integration: real Ray, Serve, browser).
test: lint browser orthanc monailabel-client
	$(VENV)/bin/pytest

# The fast tier: no Ray cluster, no subprocesses, no browser (a unit test that starts Ray is refused); ~1 minute.
test-unit: lint
	$(VENV)/bin/pytest tests/unit -m "not integration"

# ruff (style, pyflakes, import order and imports at module top) and import-linter (the layers, pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check rau_ray tests benchmarks jobs
	$(VENV)/bin/lint-imports --no-cache

# The README's web page screenshot, retaken by the browser test (plain test runs write only to temp folders).
docs-pictures: $(STAMP) browser
	RAU_WEB_PAGE_PNG=docs/web_page.png $(VENV)/bin/pytest tests/integration/test_web_page.py

bench: $(STAMP)
	$(PY) benchmarks/phantom_throughput.py

clean:
	rm -rf runs .pytest_cache
