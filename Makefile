# Two entry points for a newcomer (README.md): `make demo` and `make test`.
# Both create .venv on first use; `make test` and `make bench` also install the Debian packages that
# tests and benchmarks start as real servers (scripts/system-deps: etcd-server, redis-server).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvcache up

test: $(STAMP)
	scripts/system-deps
	$(PY) -m pytest

bench: $(STAMP)
	scripts/system-deps
	$(PY) benchmarks/data_path.py
