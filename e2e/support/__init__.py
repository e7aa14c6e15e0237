"""Shared end-to-end helpers: free ports, real Envoy, the picker (in-process or subprocess), upstreams."""
