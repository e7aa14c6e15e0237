"""The planner: how many pods of which accelerator kind a workload needs under latency targets.

Pure logic over the one cost model (``engine.costmodel``) and what the data layer observes: it never
imports the simulator. ``catalogue`` (kinds and prices), ``capacity`` (one pod's sustainable rate within the
SLO, from the cost model and the length distribution's tail), ``autoscale`` (the planners that turn
observations into desired replicas, with forecast, hysteresis and cooldown).
"""

from pickers.planner.autoscale import (
    PLANNERS,
    Desired,
    DynamoThroughputPlanner,
    KvswitchPlanner,
    Observation,
    PoolState,
    QueueHpaPlanner,
    Slo,
    StaticPlanner,
    cheapest_kind,
    make_planner,
)
from pickers.planner.capacity import LoadShape, PodKind, pod_capacity, pods_needed
from pickers.planner.catalogue import DEFAULT_PRICES, PRICE_SOURCE, Catalogue, parse_accelerators

__all__ = [
    "DEFAULT_PRICES", "PLANNERS", "PRICE_SOURCE", "Catalogue", "Desired", "DynamoThroughputPlanner",
    "KvswitchPlanner", "LoadShape", "Observation", "PodKind", "PoolState", "QueueHpaPlanner", "Slo",
    "StaticPlanner", "cheapest_kind", "make_planner", "parse_accelerators", "pod_capacity", "pods_needed",
]
