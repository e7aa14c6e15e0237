"""Envoy bootstrap generation for kvswitch (typed with envoy-data-plane, written as YAML/JSON)."""

from extproc.envoyconfig.builder import EnvoyConfigOptions, build_bootstrap, render

__all__ = ["EnvoyConfigOptions", "build_bootstrap", "render"]
