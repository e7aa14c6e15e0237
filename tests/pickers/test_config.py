"""Configuration: defaults, named profiles, and errors that name the bad key."""

from __future__ import annotations

import pytest
import yaml

from pickers.config import ConfigError
from pickers.profiles import BUILTIN_PROFILES

from .helpers import endpoints, request, scheduler


def test_defaults_and_every_builtin_profile_decides():
    for name in [None, *BUILTIN_PROFILES]:
        s, _ = scheduler(raw=None if name is None else {"profile": name})
        d = s.decide(request("r", list(range(100))))
        assert d.profile == (name or "default") and len(d.endpoints) == 3


@pytest.mark.parametrize("raw, path", [
    ({"scorers": [{"type": "queue"}, {"type": "kv-usage"}, {"type": "prefix", "weight": "x"}]},
     "scheduler.scorers[2].weight: expected a number"),
    ({"scorers": [{"type": "nope"}]}, "scheduler.scorers[0].type: unknown scorer 'nope'"),
    ({"scorers": [{"type": "prefix", "mode": "psychic"}]}, "scheduler.scorers[0].mode: must be one of"),
    ({"scorers": [{"type": "queue", "bogus": 1}]}, "scheduler.scorers[0].bogus: unknown parameter"),
    ({"profile": "nope"}, "scheduler.profile: unknown profile 'nope'"),
    ({"profiles": {"mine": {"picker": {"type": "max-score", "max_endpoints": 0}}}},
     "scheduler.profiles.mine.picker.max_endpoints: must be >= 1"),
    ({"datalayer": {"scrape_interval_ms": "fast"}}, "scheduler.datalayer.scrape_interval_ms: expected a number"),
    ({"prefix": {"precise": {"medium_weights": {"GPU": 2}}}}, "scheduler.prefix.precise.medium_weights.GPU"),
    ({"admission": [{"type": "saturation", "objectives": {"b": "low"}}]}, "scheduler.admission[0]: objectives.b"),
    ({"colour": 1}, "scheduler.colour: unknown key"),
    ({"predictor": {"kv_from_metrics": "yes"}}, "scheduler.predictor.kv_from_metrics: expected"),
    ({"predictor": {"step_in_progress": 0.5}}, "scheduler.predictor.step_in_progress: expected"),
    ({"tokenizer": {"path": "/nonexistent/tok"}}, "scheduler.tokenizer.path: cannot load"),
    ([1], "scheduler: expected a mapping"),
])
def test_errors_name_the_key(raw, path):
    with pytest.raises(ConfigError) as e:
        scheduler(raw=raw)
    assert str(e.value).startswith(path), str(e.value)


def test_yaml_example_with_own_profile():
    raw = yaml.safe_load("""
profile: mine
profiles:
  mine:
    filters: [health, {type: role, role: decode}]
    scorers:
      - {type: queue, weight: 2}
      - {type: prefix, mode: approximate, weight: 3}
    picker: {type: max-score, max_endpoints: 2}
""")
    s, _ = scheduler(raw=raw)
    d = s.decide(request("r", list(range(64))))
    assert d.profile == "mine" and len(d.endpoints) == 2
    assert set(next(iter(d.explanation.values()))) == {"queue", "prefix-approximate", "total"}
    assert set(d.explanation["_slo"]) == {"pred-ttft-ms", "pred-tpot-ms"}  # no targets: predictions only


def test_bad_endpoint_profile_is_reported():
    with pytest.raises(ConfigError, match=r"endpoints\[1\]: unknown accelerator"):
        scheduler(eps=[*endpoints(1), *endpoints(2, accelerator="TPU")[1:]])


def test_the_predictors_settings_reach_it():
    s, _ = scheduler(raw={"predictor": {"kv_from_metrics": True, "step_in_progress": False}})
    got = s.dl.predictor.settings
    assert got.kv_from_metrics is True and got.step_in_progress is False
    d, _ = scheduler(raw=None)
    assert d.dl.predictor.settings.kv_from_metrics is False and d.dl.predictor.settings.step_in_progress is True
