# The two commands of the README: `make demo` and `make test`. Both create .venv here if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.adaptbir-installed
PYTEST_ARGS ?=

.PHONY: install browser demo test test-ray test-slow lint clean

install: $(STAMP)

# torch/torchvision are pinned in the `export` extra (a bare `torch` would pull a multi-GB CUDA build);
# pyiqa is installed --no-deps, since its declared dependencies include transformers, datasets, bitsandbytes...
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"  # PEP 639 license; the packaging test builds with it
	$(PY) -m pip install --quiet -e '.[export,openvino,ray,test]'
	$(PY) -m pip install --quiet --no-deps pyiqa==0.1.16
	$(PY) tools/prune_pyiqa.py
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m adaptbir.demo

# Two workers on this 2-core machine (up to 4 elsewhere), a test file per worker at a time, so module
# fixtures are built once; session engines are built once for all workers (tests/conftest.py).
test: $(STAMP) lint
	$(PY) -m pytest -n auto --maxprocesses 4 --dist loadfile $(PYTEST_ARGS)

test-ray: $(STAMP) browser  # a local Ray cluster (loopback): adaptbir-ray against the single-process CLI, the page
	$(PY) -m pytest -m ray $(PYTEST_ARGS)

# The service's page is tested in Debian's Chromium, driven by its own ChromeDriver through Selenium (a test
# tool's own browser download is not possible everywhere this runs).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; }

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
