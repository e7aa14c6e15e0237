"""The local stack behind ``kvswitch up`` and ``kvswitch demo``: simulated fleet + picker + Envoy on loopback."""

from extproc.localstack.stack import LocalStack, StackOptions, StackPod

__all__ = ["LocalStack", "StackOptions", "StackPod"]
