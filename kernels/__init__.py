"""GPU kernels the fleet side needs, each with a plain PyTorch reference that runs on the CPU."""
