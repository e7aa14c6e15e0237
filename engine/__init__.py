"""The fleet side: simulated engines, the prefill/decode sidecar, presets and the shared cost model."""

# The accept queue vLLM's API server listens with (uvicorn's default backlog; vLLM 0.32's launcher passes it to
# listen()). A server that stands for a vLLM pod, or in front of one, takes a burst of new connections as the pod
# does: with aiohttp's 128, a burst that arrives while the loop is busy overflows the queue, and the connects
# the kernel drops are retried after a second, past Envoy's 1-s connect timeout.
VLLM_LISTEN_BACKLOG = 2048
