"""Repository-wide pytest setup: fixtures that several test folders share."""

# Real vLLM on the CPU (tiny random-weight model): the vllm_pair / tiny_model_dir fixtures.
pytest_plugins = ["e2e.vllmcpu.fixtures"]
