"""Real vLLM (CPU build) for tests: a tiny random model, a server process, KV-event and metrics capture.

Nothing here imports vLLM or torch: those live only in the separate ``.venv-vllm`` environment, which the
helpers drive as subprocesses through :func:`e2e.vllmcpu.env.vllm_python`.
"""
