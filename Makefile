# Two entry points for a newcomer (README.md): `make demo` and `make test`.
# Both create .venv on first use; `make bench` also installs the Debian packages benchmarks start
# as peers (scripts/system-deps: redis-server).
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
	$(PY) -m pytest

bench: $(STAMP)
	scripts/system-deps
	$(PY) benchmarks/data_path.py
