"""Virtual-time discrete-event cluster simulator: many EngineCores, one router, a trace."""

from engine.sim.cluster.fleet import FleetSpec, PodSpec, fleet_from_flags, load_fleet
from engine.sim.cluster.report import format_table, summarize
from engine.sim.cluster.routers import (
    BaseRouter,
    ClusterRequest,
    RoundRobinRouter,
    Router,
    SchedulerRouter,
    make_router,
)
from engine.sim.cluster.simulator import ClusterSim, RequestRecord, SimResult, endpoints_for, trace_prompts
from engine.sim.cluster.trace import BlockTokens, TraceRequest, read_mooncake, shape_trace

__all__ = [
    "BaseRouter", "BlockTokens", "ClusterRequest", "ClusterSim", "FleetSpec", "PodSpec", "RequestRecord",
    "RoundRobinRouter", "Router", "SchedulerRouter", "SimResult", "TraceRequest", "endpoints_for",
    "fleet_from_flags", "format_table", "load_fleet", "make_router", "read_mooncake",
    "shape_trace", "summarize", "trace_prompts",
]
