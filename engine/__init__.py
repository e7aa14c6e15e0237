"""The fleet side: simulated engines, the prefill/decode sidecar, presets and the shared cost model."""
