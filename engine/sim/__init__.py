"""A vLLM-compatible simulated engine and fleet (DESIGN.md, engine/sim).

Layers, each its own module: ``blockpool`` (vLLM v1 prefix cache), ``core`` (clock-agnostic continuous
batching: EngineCore), ``kvevents`` (ZMQ KV events), ``faults``, ``server`` (one pod in real time),
``fleet`` (many pods, YAML config), ``cli`` (``kvswitch sim``). Import the module you need; this package
imports nothing heavy.
"""
