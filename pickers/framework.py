"""The scheduling framework: plugin kinds, the per-request cycle context, profiles and the registry.

A request goes through: admission plugins (accept or raise SchedulingError 429) -> the profile handler,
which runs one or more profiles. A profile is filters (narrow the candidate slots) -> scorers (each returns
one number in [0,1] per candidate, combined as a weighted sum) -> a picker (orders candidates, best first,
giving the fallback list). The decode-only handler runs one profile; a prefill/decode handler runs the
decode profile first, looks at the chosen pod's cache, then maybe a prefill profile, and sets
``Decision.prefill``.

Candidates are numpy int arrays of endpoint slots and every signal is an array indexed by slot, so a
decision over 64 pods is a few dozen vector operations, not 64 x plugins Python calls.

Plugins may also implement request hooks (``on_routed``, ``on_served``, ``on_first_token``,
``on_finished``, ``on_failed``): the base class defines them as no-ops, and the director calls those a
plugin overrides (pickers/director.py owns a request's whole way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np

from engine.kvcache.hashing import MAX_ROUTED_BLOCKS, hash_block_keys
from pickers.state import Prediction, PrefixMode, ProfileResult, RequestState
from pickers.types import Decision, InferenceRequest, SchedulingError, Usage

if TYPE_CHECKING:
    from pickers.datalayer import DataLayer


# ---- parameters and registry ------------------------------------------------------------------------
class ConfigError(ValueError):
    """Invalid configuration; the message starts with the key path (``scheduler.scorers[2].weight``)."""


@dataclass(frozen=True)
class Param:
    kind: type | tuple[type, ...]
    default: Any = None
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    doc: str = ""


_KIND_WORDS = {float: "a number", int: "an integer", str: "a string", bool: "true or false",
               list: "a list", dict: "a mapping"}


def check_value(path: str, value: Any, p: Param) -> Any:
    kinds = p.kind if isinstance(p.kind, tuple) else (p.kind,)
    ok = False
    for k in kinds:
        if k is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value, ok = float(value), True
        elif k is int and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        elif k is type(None) and value is None:
            ok = True
        elif k not in (float, int) and isinstance(value, k):
            ok = True
        if ok:
            break
    if not ok:
        words = " or ".join(_KIND_WORDS.get(k, "null" if k is type(None) else k.__name__) for k in kinds)
        raise ConfigError(f"{path}: expected {words}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: must be finite, got {value!r}")
        if p.min is not None and value < p.min:
            raise ConfigError(f"{path}: must be >= {p.min:g}, got {value!r}")
        if p.max is not None and value > p.max:
            raise ConfigError(f"{path}: must be <= {p.max:g}, got {value!r}")
    if p.choices is not None and value not in p.choices:
        raise ConfigError(f"{path}: must be one of {', '.join(map(str, p.choices))}, got {value!r}")
    return value


class Plugin:
    """Base of every plugin. ``PARAMS`` declares the accepted parameters (validated by the registry)."""

    KIND: ClassVar[str] = ""
    TYPE: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Param]] = {}
    needs_tokens: ClassVar[bool] = False
    # Whether the plugin reads scraped pod metrics (directly, through health, or through the prediction):
    # a profile none of whose plugins does is not worth a /metrics scrape per pod.
    reads_metrics: ClassVar[bool] = True
    dl: DataLayer

    def __init__(self, **params: Any) -> None:
        for k, p in self.PARAMS.items():
            setattr(self, k, params.get(k, p.default))

    def bind(self, dl: DataLayer) -> None:
        """Called once when the director is built (plugins keep references to what they read)."""
        self.dl = dl

    @property
    def label(self) -> str:
        return self.TYPE

    @property
    def uses_kv_events(self) -> bool:
        """Whether this plugin reads the precise index (fed by KV events). Plugins with a prefix ``mode``
        override this; the director subscribes to KV events only when some plugin of its profile does."""
        return False

    # request hooks: no-ops here; the director calls only those a plugin overrides
    def on_routed(self, decision: Decision) -> None:
        return None

    def on_served(self, decision: Decision, served: str) -> None:
        return None

    def on_first_token(self, decision: Decision, at: float) -> None:
        return None

    def on_finished(self, decision: Decision, usage: Usage | None, at: float) -> None:
        return None

    def on_failed(self, decision: Decision, reason: str, at: float) -> None:
        return None


def reads_kv_events(mode: PrefixMode) -> bool:
    """Whether a plugin reading prefix hits under ``mode`` needs the precise index."""
    return mode != "approximate"


REGISTRY: dict[str, dict[str, type[Plugin]]] = {
    "admission": {}, "filter": {}, "scorer": {}, "picker": {}, "handler": {},
}


def register(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make a plugin available by ``TYPE`` under its ``KIND``."""
    kinds = REGISTRY[cls.KIND]
    if cls.TYPE in kinds and kinds[cls.TYPE] is not cls:
        raise ValueError(f"duplicate {cls.KIND} plugin {cls.TYPE!r}")
    kinds[cls.TYPE] = cls
    return cls


def create(kind: str, spec: Any, path: str, reserved: tuple[str, ...] = ()) -> Plugin:
    """A plugin from ``{type: name, param: value, ...}`` (or just ``name``), validated."""
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping with 'type' or a plugin name, got {spec!r}")
    t = spec.get("type")
    if not isinstance(t, str):
        raise ConfigError(f"{path}.type: expected a string naming a {kind} plugin")
    cls = REGISTRY[kind].get(t)
    if cls is None:
        raise ConfigError(f"{path}.type: unknown {kind} {t!r}; known: {', '.join(sorted(REGISTRY[kind]))}")
    params = {}
    for k, v in spec.items():
        if k == "type" or k in reserved:
            continue
        p = cls.PARAMS.get(k)
        if p is None:
            known = ", ".join(sorted(set(cls.PARAMS) | set(reserved) | {"type"}))
            raise ConfigError(f"{path}.{k}: unknown parameter of {kind} {t!r}; known: {known}")
        params[k] = check_value(f"{path}.{k}", v, p)
    try:
        plugin = cls(**params)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return plugin


P = TypeVar("P", bound=Plugin)


def create_as(base: type[P], spec: Any, path: str, reserved: tuple[str, ...] = ()) -> P:
    """``create`` for the plugin kind ``base`` (Filter, Scorer, ...), typed as that kind."""
    plugin = create(base.KIND, spec, path, reserved)
    if not isinstance(plugin, base):  # a registry entry of the wrong class: a programming error, said plainly
        raise ConfigError(f"{path}: {type(plugin).__name__} is registered as a {base.KIND} but is not one")
    return plugin


# ---- plugin kinds -------------------------------------------------------------------------------------
class Admission(Plugin):
    KIND = "admission"
    stale_endpoints: int = 0  # ready endpoints whose stale signals the last check ignored (a metric)
    prefill_legs: bool = False  # set by the director: the handler may run prompts on prefill pods

    def admit(self, ctx: CycleContext) -> None:
        """Return to accept; raise SchedulingError(429, ...) to shed."""
        raise NotImplementedError


class Filter(Plugin):
    KIND = "filter"

    def filter(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Scorer(Plugin):
    KIND = "scorer"

    def score(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray:
        """One float in [0, 1] per candidate, higher is better."""
        raise NotImplementedError

    def tiers(self, ctx: CycleContext, cands: np.ndarray) -> np.ndarray | None:
        """Optional: an integer tier per candidate (higher first) that orders candidates before any score
        (``Profile.run``): every candidate of a higher tier ranks above every one of a lower tier, whatever
        the weighted sum. None (the default): no tiers. Called after ``score`` in the same cycle."""
        return None


class PrefixModeScorer(Scorer):
    """Base of the scorers that read a request's prefix hits (directly or through its prediction) under a
    ``mode``: ``approximate`` (learned from kvswitch's own decisions), ``precise`` (vLLM KV events) or
    ``auto`` (precise per pod unless it publishes no events or is degraded). They need the prompt's tokens,
    and the director subscribes to KV events only when one of them reads the precise index."""

    needs_tokens = True
    PARAMS = {"mode": Param(str, "auto", choices=("approximate", "precise", "auto"))}
    mode: PrefixMode

    @property
    def uses_kv_events(self) -> bool:
        return reads_kv_events(self.mode)


class Picker(Plugin):
    KIND = "picker"
    reads_metrics = False
    PARAMS = {"max_endpoints": Param(int, 3, min=1, max=64, doc="length of the fallback list")}
    max_endpoints: int
    seed: int | None = None  # pickers that draw at random take a ``seed`` parameter

    def pick(self, ctx: CycleContext, cands: np.ndarray, totals: np.ndarray) -> np.ndarray:
        """Positions into ``cands``, best first, at most ``max_endpoints``."""
        raise NotImplementedError


class ProfileHandler(Plugin):
    KIND = "handler"

    profile: str | None = None  # the profile it runs (None: scheduler.profile)
    runs_prefill_legs: ClassVar[bool] = False  # may compute a prompt on a prefill pod (admission reads it)

    def handle(self, ctx: CycleContext, profiles: dict[str, Profile], default: str) -> Decision:
        """Run the profile(s) over ``ctx.candidates``; record each ProfileResult in ``ctx.state.results``."""
        raise NotImplementedError


# ---- profiles -----------------------------------------------------------------------------------------
@dataclass
class Profile:
    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    flow_control: bool = False  # hold requests while no pod has room (pickers/flowcontrol.py)

    @property
    def needs_tokens(self) -> bool:
        return any(s.needs_tokens for s, _ in self.scorers) or any(f.needs_tokens for f in self.filters)

    @property
    def plugins(self) -> list[Plugin]:
        return [*self.filters, *(s for s, _ in self.scorers), self.picker]

    def run(self, ctx: CycleContext, cands: np.ndarray) -> ProfileResult:
        for f in self.filters:
            cands = f.filter(ctx, cands)
            if cands.size == 0:
                break
        if cands.size == 0:
            raise ctx.no_endpoint(self.name)
        totals = np.zeros(cands.size)
        scores: dict[str, np.ndarray] = {}
        tiers: np.ndarray | None = None
        for s, w in self.scorers:
            v = s.score(ctx, cands)
            scores[s.label] = v
            totals += w * v
            t = s.tiers(ctx, cands)
            if t is not None:
                tiers = t if tiers is None else np.minimum(tiers, t)
        if tiers is not None and np.any(tiers != tiers[0]):
            # lexicographic: each score is in [0, 1], so a tier step above the largest possible weighted sum
            # puts every candidate of a higher tier first; within a tier the weighted sum decides
            totals = totals + tiers * (sum(abs(w) for _, w in self.scorers) + 1.0)
        order = self.picker.pick(ctx, cands, totals)
        return ProfileResult(self.name, cands[order], cands, totals, scores)


# ---- the per-request context ----------------------------------------------------------------------------
class CycleContext:
    """One scheduling cycle's view of a request: its typed state, the data layer and the decision time.

    Plugins read derived values through these methods; each is computed on first use and kept in
    ``state`` (pickers/state.py), so every plugin of the cycle and the response hooks see the same value.
    """

    __slots__ = ("state", "dl", "now")

    def __init__(self, state: RequestState, dl: DataLayer, now: float) -> None:
        self.state = state
        self.dl = dl
        self.now = now

    @property
    def request(self) -> InferenceRequest:
        return self.state.request

    @property
    def candidates(self) -> np.ndarray:
        """Slots the director allows for this request (active endpoints inside the gateway's subset hint)."""
        c = self.state.candidates
        return c if c is not None else self.dl.endpoints.active_slots()

    @property
    def rejected(self) -> dict[str, int]:
        return self.state.rejected

    # tokens and block hashes
    def token_ids(self) -> np.ndarray:
        st = self.state
        if st.tokens is None:
            st.tokens = self.dl.tokens.tokens_sync(st.request)
        return st.tokens

    def prompt_tokens(self) -> int:
        st = self.state
        if st.tokens is not None:
            return int(st.tokens.size)
        if st.request.prompt_token_ids is not None:
            return len(st.request.prompt_token_ids)
        return self.dl.tokens.estimate(st.request)

    def block_hashes(self, block_size: int) -> np.ndarray:
        got = self.state.block_hashes.get(block_size)
        if got is None:
            got = hash_block_keys(self.token_ids(), block_size, limit=MAX_ROUTED_BLOCKS)
            self.state.block_hashes[block_size] = got
        return got

    def hit_tokens(self, mode: PrefixMode) -> np.ndarray:
        """Per endpoint slot: prompt tokens already cached (weighted by medium) per ``mode``:
        ``approximate`` (learned from our decisions), ``precise`` (KV events) or ``auto`` (precise where the
        pod publishes events and is not degraded, approximate elsewhere)."""
        got = self.state.hits.get(mode)
        if got is None:
            got = self.dl.prefix_hits(self, mode)
            self.state.hits[mode] = got
        return got

    def prediction(self, mode: PrefixMode = "auto") -> Prediction:
        """Expected TTFT/TPOT per endpoint slot (pickers/predictor.py), once per mode and request."""
        got = self.state.predictions.get(mode)
        if got is None:
            got = self.dl.predictor.predict(self, mode)
            self.state.predictions[mode] = got
        return got

    def no_endpoint(self, profile: str) -> SchedulingError:
        dl = self.dl
        n = len(dl.endpoints)
        healthy = int(np.count_nonzero(dl.health.healthy[dl.endpoints.active_slots()]))
        why = ", ".join(f"{k} removed {v}" for k, v in self.rejected.items() if v) or "no endpoints configured"
        return SchedulingError(
            503,
            f"no ready endpoint for model {self.request.model!r} (profile {profile}): {n} endpoints known, "
            f"{healthy} healthy; {why}. Check that the pods are up and that /metrics answers.",
            "no_endpoint_available",
        )


__all__ = [
    "Admission", "ConfigError", "CycleContext", "Filter", "Param", "Picker", "Plugin", "PrefixModeScorer", "Profile",
    "ProfileHandler", "ProfileResult", "REGISTRY", "Scorer", "check_value", "create", "create_as", "reads_kv_events",
    "register",
]
