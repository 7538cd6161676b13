# Everything a fresh machine needs lives here: `make demo` and `make test` create .venv first.
PY := .venv/bin/python
# torch 2.14.1 + torchvision 0.29.1 are on local disk here (about 1.5 min); CPU is enough.
TORCH := torch==2.14.1 torchvision==0.29.1

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: demo test lint format bench
# The demo's run dir is its own: --force replaces the previous demo run.
demo: .venv/.installed
	.venv/bin/admmprune demo --force

lint: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: .venv/.installed
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

# Two worker processes (pytest-xdist): CI's machine has 2 cores and most tests run one at a time;
# loadgroup keeps an xdist_group (tests sharing a session fixture, e.g. the demo run) on one worker.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadgroup

bench: .venv/.installed
	$(PY) benchmarks/overhead.py
