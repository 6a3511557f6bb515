# Two entry points: `make demo` and `make test`. Both create the environment on first use and are
# idempotent: the environment is rebuilt only when pyproject.toml or requirements.lock change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.floss-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch could pull a different multi-GB build
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c requirements.lock -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

# The main job on the embedded default profile (synthetic data, CPU, offline).
demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m floss demo

# Two pytest-xdist workers, one test file each at a time, longest files first (tests/conftest.py); one process:
# make test PYTEST_WORKERS=0
PYTEST_WORKERS ?= 2
test: setup
	CUDA_VISIBLE_DEVICES= PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_stats.py
	$(PY) benchmarks/bench_fusion.py

clean-venv:
	rm -rf $(VENV)
