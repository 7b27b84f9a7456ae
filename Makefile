# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the pinned stack into it (constraints.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test install browser bench clean

install: $(STAMP) browser

# Debian chromium for the web page's browser test (Playwright drives /usr/bin/chromium; no browser download).
# Where apt-get is missing or not allowed this only warns, and tests/integration/test_web_page.py fails saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium (apt-get failed); the browser test will fail"

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: its CPU/CUDA wheel comes from the local index here; sam2 and deepspeed build against it.
	$(PIP) torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 DS_BUILD_OPS=0 $(PIP) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rau demo --out runs/demo

test: $(STAMP) browser
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) benchmarks/phantom_throughput.py

clean:
	rm -rf runs .pytest_cache
