# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install the pinned stack into it (constraints.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: its CPU/CUDA wheel comes from the local index here; sam2 and deepspeed build against it.
	$(PIP) torch==2.14.1 torchvision==0.29.1
	SAM2_BUILD_CUDA=0 DS_BUILD_OPS=0 $(PIP) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rau demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/pytest

bench: $(STAMP)
	$(PY) benchmarks/phantom_throughput.py

clean:
	rm -rf runs .pytest_cache
