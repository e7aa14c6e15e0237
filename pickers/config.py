"""Building a scheduler from the ``scheduler:`` section of the picker's YAML file (validated, paths in
every error message). No section at all gives the ``default`` profile with every default below.

    scheduler:
      profile: default            # default | round-robin | random | load-only | approximate | precise | <own>
      handler: {type: decode-only}
      admission:                  # list; default: [saturation]. Types: none, saturation, stage-saturation,
        - {type: saturation, queue_threshold: 5, kv_threshold: 0.8}   # early, predictive (pickers/plugins)
      objectives:                 # objective name (x-llm-d-inference-objective / x-gateway-inference-objective)
        interactive: {priority: 10, ttft_ms: 500, tpot_ms: 50}        # -> priority and default targets
        batch: {priority: -1}     # priority < 0: sheddable
      slo: {ttft_ms: null, tpot_ms: null}   # the pool's default targets (pickers/slo.py)
      profiles:                   # your own, or overriding built-in ones by name
        mine:
          filters: [health, subset, {type: role, role: decode}]
          scorers:
            - {type: ttft, weight: 3}
            - {type: prefix, mode: auto, gate_ttft_ratio: 1.5, weight: 1}
            - {type: queue, weight: 1}
          picker: {type: max-score, max_endpoints: 3}
      # or, short for one profile named after `profile` (or "custom"):
      # filters: [...]; scorers: [...]; picker: {...}
      tokenizer: {path: null, cache_size: 4096, offload_min_chars: 16384}
      datalayer: {scrape_interval_ms: 50, scrape_read_families_only: true, stale_after_intervals: 4,
                  failure_threshold: 3, max_endpoints: 1024, inflight_ttl_s: 600,
                  dp_ranks: auto}   # auto: a pod whose /metrics shows several engines (vLLM data-parallel
                                    # ranks) becomes one endpoint per rank; off: pods stay one endpoint
      prefix:
        approximate: {max_blocks: 4000000, pod_blocks: 200000}
        precise: {max_blocks: 10000000, medium_weights: {GPU: 1.0, CPU: 0.8}, engine_map_cap: 2000000,
                  degraded_after_s: 10, topic: "", pending_ttl_s: 5, pending_max_blocks: 1000000}
      predictor: {decode_context_tokens: 2048, waiting_prompt_tokens: 0,   # pickers/predictor.py
                  correction: true, correction_window: 64,
                  kv_from_metrics: false, step_in_progress: true,
                  time_scale: 1}          # wall s per cost-model s: simulated pods at a time scale only
      explain_top: 5
      default_decode_tokens: 256
      prefill_end_from_kv_events: false   # access-log mode: end a prefill at its pod's KV event (director.py)
      flow_control:               # hold requests in the picker while no pod has room (pickers/flowcontrol.py)
        enabled: null             # null: the profile's own `flow_control` (the default profile: true)
        room: 1                   # a pod has room while fewer requests than this wait in its queue,
        step_share: 0.75          #    or while its next step takes its queue, a mean prompt and its decodes
                                  #    within this share of its token budget (with KV and a slot; 0: off)
        max_queued: 4096          # past this many held, a request is decided at once
        max_wait_s: 600           # a held request is decided by then, room or not
        tick_ms: 10               # how often the room is re-checked while requests are held
        room_first: true          # released for room: to a pod with room (README "Flow control")
        cache_loss: 0.25          #    unless that loses more of the prompt's cached tokens than this share
        window: 256               # released for room: one of the 256 oldest held may pass the oldest
        pass_ratio: 4             #    when its prefill is under 1/4 of the oldest's (1 window: arrival order),
        pass_slack: 0.5           #    and by no more prefill than half of what was held ahead of it and its own

Each endpoint's step token budget (vLLM ``max_num_batched_tokens``) is the endpoint's own
``max_num_batched_tokens`` or, when unset, what engine.presets deploys for its model, accelerator and role.
"""

from __future__ import annotations

import copy
from typing import Any

import pickers.plugins  # noqa: F401  (registers the built-in plugins)
from engine.tokens.tokenizer import load_tokenizer
from pickers.clock import Clock, MonotonicClock
from pickers.costs import cost_model, preset_budget
from pickers.datalayer import DataLayer, DataLayerSettings
from pickers.datalayer.endpoints import StaticDiscovery
from pickers.director import Director
from pickers.flowcontrol import FlowControlSettings
from pickers.framework import (
    Admission,
    ConfigError,
    Filter,
    Param,
    Picker,
    Profile,
    ProfileHandler,
    Scorer,
    check_value,
    create_as,
)
from pickers.plugins.admission_saturation import SaturationAdmission
from pickers.predictor import PredictorSettings
from pickers.profiles import BUILTIN_PROFILES, DECODE_FILTERS, RANK_OBLIVIOUS
from pickers.promstats import scheduler_metrics
from pickers.ranks import fold_ranks
from pickers.slo import PRIORITY_MAX, PRIORITY_MIN, TPOT_MS_MAX, TTFT_MS_MAX, Objective, SLOPolicy
from pickers.tokenize import TokenService
from pickers.types import Endpoint

__all__ = ["ConfigError", "build_scheduler"]

ROOT = "scheduler"
_TOP = {"profile", "handler", "admission", "profiles", "filters", "scorers", "picker", "tokenizer",
        "datalayer", "prefix", "predictor", "explain_top", "default_decode_tokens", "objectives", "slo",
        "prefill_end_from_kv_events", "flow_control"}


def _mapping(path: str, v: Any) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{path}: expected a mapping, got {v!r}")
    return v


def _keys(path: str, d: dict[str, Any], allowed: set[str]) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{path}.{k}: unknown key; known: {', '.join(sorted(allowed))}")


def _get(path: str, d: dict[str, Any], key: str, p: Param) -> Any:
    if key not in d or d[key] is None and p.default is not None:
        return p.default
    return check_value(f"{path}.{key}", d[key], p)


def _list(path: str, v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise ConfigError(f"{path}: expected a list, got {v!r}")
    return v


def _target_s(path: str, d: dict[str, Any], key: str, upper: float) -> float | None:
    v = _get(path, d, key, Param((float, type(None)), None, min=1e-3, max=upper))
    return None if v is None else v / 1e3


def _slo_policy(cfg: dict[str, Any], admission: list[Any]) -> SLOPolicy:
    """``scheduler.objectives`` and ``scheduler.slo``; the saturation admission's older ``objectives``
    (name -> priority) are folded in, and a name given two different priorities is an error."""
    op = f"{ROOT}.objectives"
    objectives: dict[str, Objective] = {}
    for name, raw in _mapping(op, cfg.get("objectives")).items():
        path = f"{op}.{name}"
        o = _mapping(path, raw)
        _keys(path, o, {"priority", "ttft_ms", "tpot_ms"})
        objectives[str(name)] = Objective(
            _get(path, o, "priority", Param(int, 0, min=PRIORITY_MIN, max=PRIORITY_MAX)),
            _target_s(path, o, "ttft_ms", TTFT_MS_MAX), _target_s(path, o, "tpot_ms", TPOT_MS_MAX))
    for i, a in enumerate(admission):  # the saturation rule's own objective priorities (its older parameter)
        if not isinstance(a, SaturationAdmission):
            continue
        for name, prio in a.objectives.items():
            have = objectives.get(name)
            if have is None:
                objectives[name] = Objective(prio)
            elif have.priority != prio:
                raise ConfigError(
                    f"{ROOT}.admission[{i}].objectives.{name}: priority {prio} disagrees with {op}.{name}.priority "
                    f"{have.priority}; give priorities once, under {op}")
    sp = f"{ROOT}.slo"
    d = _mapping(sp, cfg.get("slo"))
    _keys(sp, d, {"ttft_ms", "tpot_ms"})
    return SLOPolicy(objectives, _target_s(sp, d, "ttft_ms", TTFT_MS_MAX), _target_s(sp, d, "tpot_ms", TPOT_MS_MAX))


def _profile(path: str, name: str, raw: Any) -> Profile:
    raw = _mapping(path, raw)
    _keys(path, raw, {"filters", "scorers", "picker", "flow_control"})
    filters = [create_as(Filter, f, f"{path}.filters[{i}]")
               for i, f in enumerate(_list(f"{path}.filters", raw.get("filters", DECODE_FILTERS)))]
    scorers = []
    for i, s in enumerate(_list(f"{path}.scorers", raw.get("scorers", []))):
        sp = f"{path}.scorers[{i}]"
        weight = 1.0
        if isinstance(s, dict) and "weight" in s:
            weight = check_value(f"{sp}.weight", s["weight"], Param(float, 1.0, min=0.0))
        scorers.append((create_as(Scorer, s, sp, reserved=("weight",)), weight))
    picker = create_as(Picker, raw.get("picker", {"type": "max-score"}), f"{path}.picker")
    return Profile(name, filters, scorers, picker,
                   check_value(f"{path}.flow_control", raw.get("flow_control", False), Param(bool, False)))


def build_scheduler(
    raw: dict[str, Any] | None,
    endpoints: list[Endpoint],
    clock: Clock | None = None,
    *,
    network: bool = True,
    registry: Any = None,
    max_fallback: int = 0,
) -> Director:
    """The director from the ``scheduler:`` section (``None`` = defaults) over ``endpoints``.

    ``network=False`` (virtual time, tests): no scrapers or subscribers; feed ``director.dl`` directly.
    ``registry``: a prometheus CollectorRegistry (default: the global one). ``max_fallback``: the longest
    fallback list sent to the gateway (``server.max_fallback``; 0: the picker's whole ranking).
    """
    clock = clock or MonotonicClock()
    cfg = _mapping(ROOT, copy.deepcopy(raw))
    _keys(ROOT, cfg, _TOP)

    # data layer settings
    dlp = f"{ROOT}.datalayer"
    d = _mapping(dlp, cfg.get("datalayer"))
    _keys(dlp, d, {"scrape_interval_ms", "scrape_read_families_only", "stale_after_intervals", "failure_threshold",
                   "max_endpoints", "inflight_ttl_s", "dp_ranks"})
    pp = f"{ROOT}.prefix"
    pr = _mapping(pp, cfg.get("prefix"))
    _keys(pp, pr, {"approximate", "precise"})
    ap = _mapping(f"{pp}.approximate", pr.get("approximate"))
    _keys(f"{pp}.approximate", ap, {"max_blocks", "pod_blocks"})
    pc = _mapping(f"{pp}.precise", pr.get("precise"))
    _keys(f"{pp}.precise", pc, {"max_blocks", "medium_weights", "engine_map_cap", "degraded_after_s", "topic",
                                    "pending_ttl_s", "pending_max_blocks"})
    weights = _get(f"{pp}.precise", pc, "medium_weights", Param(dict, {"GPU": 1.0, "CPU": 0.8}))
    for k, v in weights.items():
        check_value(f"{pp}.precise.medium_weights.{k}", v, Param(float, min=0.0, max=1.0))
    if not weights:
        raise ConfigError(f"{pp}.precise.medium_weights: must name at least one medium")
    settings = DataLayerSettings(
        max_endpoints=_get(dlp, d, "max_endpoints", Param(int, 1024, min=1, max=65536)),
        scrape_interval_s=_get(dlp, d, "scrape_interval_ms", Param(float, 50.0, min=1.0)) / 1000.0,
        scrape_read_families_only=_get(dlp, d, "scrape_read_families_only", Param(bool, True)),
        stale_after_intervals=_get(dlp, d, "stale_after_intervals", Param(float, 4.0, min=1.0)),
        failure_threshold=_get(dlp, d, "failure_threshold", Param(int, 3, min=1)),
        inflight_ttl_s=_get(dlp, d, "inflight_ttl_s", Param(float, 600.0, min=1.0)),
        approx_max_blocks=_get(f"{pp}.approximate", ap, "max_blocks", Param(int, 4_000_000, min=1)),
        approx_pod_blocks=_get(f"{pp}.approximate", ap, "pod_blocks", Param(int, 200_000, min=1)),
        precise_max_blocks=_get(f"{pp}.precise", pc, "max_blocks", Param(int, 10_000_000, min=1)),
        medium_weights={str(k).upper(): float(v) for k, v in weights.items()},
        engine_map_cap=_get(f"{pp}.precise", pc, "engine_map_cap", Param(int, 2_000_000, min=1)),
        degraded_after_s=_get(f"{pp}.precise", pc, "degraded_after_s", Param(float, 10.0, min=0.0)),
        kv_events_topic=_get(f"{pp}.precise", pc, "topic", Param(str, "")),
        pending_ttl_s=_get(f"{pp}.precise", pc, "pending_ttl_s", Param(float, 5.0, min=0.0)),
        pending_max_blocks=_get(f"{pp}.precise", pc, "pending_max_blocks", Param(int, 1_000_000, min=0)),
        dp_ranks=_get(dlp, d, "dp_ranks", Param(str, "auto", choices=("auto", "off"))),
    )

    # tokens
    tp = f"{ROOT}.tokenizer"
    t = _mapping(tp, cfg.get("tokenizer"))
    _keys(tp, t, {"path", "cache_size", "offload_min_chars"})
    path = _get(tp, t, "path", Param((str, type(None)), None))
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{tp}.path: cannot load a tokenizer from {path!r}: {e}") from None
    tokens = TokenService(tokenizer, _get(tp, t, "cache_size", Param(int, 4096, min=1)),
                          _get(tp, t, "offload_min_chars", Param(int, 16384, min=0)))

    # profiles
    profiles_raw: dict[str, Any] = {k: v for k, v in BUILTIN_PROFILES.items()}
    own = _mapping(f"{ROOT}.profiles", cfg.get("profiles"))
    own_paths = {name: f"{ROOT}.profiles.{name}" for name in own}
    profiles_raw.update(own)
    name = _get(ROOT, cfg, "profile", Param(str, None)) if "profile" in cfg else None
    inline = {k: cfg[k] for k in ("filters", "scorers", "picker") if k in cfg}
    if inline:
        name = name or "custom"
        profiles_raw[name] = inline
        own_paths[name] = ROOT
    name = name or "default"
    if name not in profiles_raw:
        raise ConfigError(f"{ROOT}.profile: unknown profile {name!r}; known: {', '.join(sorted(profiles_raw))}")
    profiles = {n: _profile(own_paths.get(n, f"{ROOT}.profiles.{n}"), n, r) for n, r in profiles_raw.items()}

    handler = create_as(ProfileHandler, cfg.get("handler", {"type": "decode-only"}), f"{ROOT}.handler")
    hp = handler.profile
    if hp is not None and hp not in profiles:
        raise ConfigError(f"{ROOT}.handler.profile: unknown profile {hp!r}; known: {', '.join(sorted(profiles))}")
    admission = [create_as(Admission, a, f"{ROOT}.admission[{i}]")
                 for i, a in enumerate(_list(f"{ROOT}.admission", cfg.get("admission", ["saturation"])))]

    prp = f"{ROOT}.predictor"
    pcfg = _mapping(prp, cfg.get("predictor"))
    _keys(prp, pcfg, {"decode_context_tokens", "waiting_prompt_tokens", "correction", "correction_window",
                      "kv_from_metrics", "step_in_progress", "time_scale"})
    dflt = PredictorSettings()  # the defaults live on the settings' dataclass, once
    predictor = PredictorSettings(
        decode_context_tokens=_get(prp, pcfg, "decode_context_tokens",
                                   Param(float, dflt.decode_context_tokens, min=0.0)),
        waiting_prompt_tokens=_get(prp, pcfg, "waiting_prompt_tokens",
                                   Param(float, dflt.waiting_prompt_tokens, min=0.0)),
        correction=_get(prp, pcfg, "correction", Param(bool, dflt.correction)),
        correction_window=_get(prp, pcfg, "correction_window", Param(int, dflt.correction_window, min=8, max=4096)),
        kv_from_metrics=_get(prp, pcfg, "kv_from_metrics", Param(bool, dflt.kv_from_metrics)),
        step_in_progress=_get(prp, pcfg, "step_in_progress", Param(bool, dflt.step_in_progress)),
        time_scale=_get(prp, pcfg, "time_scale", Param(float, dflt.time_scale, min=1e-3, max=1e3)),
    )
    slo = _slo_policy(cfg, admission)
    fp = f"{ROOT}.flow_control"
    f = _mapping(fp, cfg.get("flow_control"))
    _keys(fp, f, {"enabled", "room", "max_queued", "max_wait_s", "tick_ms", "room_first", "cache_loss", "window",
                  "pass_ratio", "pass_slack", "step_share"})
    fd = FlowControlSettings()
    flow = FlowControlSettings(
        enabled=_get(fp, f, "enabled", Param((bool, type(None)), None)),
        room=_get(fp, f, "room", Param(float, fd.room, min=1.0, max=1e6)),
        max_queued=_get(fp, f, "max_queued", Param(int, fd.max_queued, min=1, max=10_000_000)),
        max_wait_s=_get(fp, f, "max_wait_s", Param(float, fd.max_wait_s, min=0.0, max=86_400.0)),
        tick_s=_get(fp, f, "tick_ms", Param(float, fd.tick_s * 1e3, min=1.0, max=10_000.0)) / 1e3,
        room_first=_get(fp, f, "room_first", Param(bool, fd.room_first)),
        cache_loss=_get(fp, f, "cache_loss", Param(float, fd.cache_loss, min=0.0, max=1.0)),
        window=_get(fp, f, "window", Param(int, fd.window, min=1, max=4096)),
        pass_ratio=_get(fp, f, "pass_ratio", Param(float, fd.pass_ratio, min=1.0, max=1e6)),
        pass_slack=_get(fp, f, "pass_slack", Param(float, fd.pass_slack, min=0.0, max=1e6)),
        step_share=_get(fp, f, "step_share", Param(float, fd.step_share, min=0.0, max=1.0)),
    )

    stats = scheduler_metrics(registry)
    dl = DataLayer(
        clock, tokens, settings,
        on_degraded=lambda addr, on, why: stats.degraded.labels(addr).set(1 if on else 0),
        on_health=lambda addr, ok: stats.healthy.labels(addr).set(1 if ok else 0),
        predictor=predictor, discovery=StaticDiscovery(endpoints),
    )
    sched = Director(
        dl, profiles, name, handler, admission, clock, stats, network=network,
        explain_top=_get(ROOT, cfg, "explain_top", Param(int, 5, min=1)),
        default_decode_tokens=_get(ROOT, cfg, "default_decode_tokens", Param(int, 256, min=1)),
        max_fallback=max_fallback, slo=slo,
        prefill_end_from_kv_events=_get(ROOT, cfg, "prefill_end_from_kv_events", Param(bool, False)),
        flow_control=flow,
    )
    if name == RANK_OBLIVIOUS:  # every data-parallel pod is one endpoint again
        endpoints = fold_ranks(endpoints)
        settings.dp_ranks = "off"
    seen: set[str] = set()
    for i, ep in enumerate(endpoints):
        if ep.id in seen:
            raise ConfigError(f"endpoints[{i}].address: duplicate endpoint {ep.id!r}")
        seen.add(ep.id)
        try:  # validates the cost-model names before the endpoint reaches the tables
            cost_model(ep.model_profile, ep.accelerator)
            if ep.max_num_batched_tokens is None:
                preset_budget(ep.model_profile, ep.accelerator, ep.role.value)
        except ValueError as e:
            raise ConfigError(f"endpoints[{i}]: {e}") from None
        sched.add_endpoint(ep)
    return sched
