# Two commands do all set-up on a fresh machine:
#   make run    # create .venv + install on first use, pre-train on digits, print the low-shot table
#   make test   # create .venv + install on first use, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# Test processes (pytest-xdist): most of the suite's time is train.py subprocesses importing
# torch and lightning, one core each; 2 keeps a 2-core machine busy (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2

.PHONY: run test lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch/torchvision first and pinned: the versions tested here (CPU or CUDA wheels alike).
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[hf,data,dev,sweep]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) train.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs multirun
