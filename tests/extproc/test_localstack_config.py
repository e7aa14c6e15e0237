"""What `kvswitch up` tells its picker about the simulated pods it starts (no process is started here)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from extproc.localstack import LocalStack, StackOptions
from pickers.config import build_scheduler


def _predictor_time_scale(options: StackOptions) -> float:
    cfg = LocalStack(options)._picker_config()
    director = build_scheduler(cfg.scheduler, [], network=False, registry=CollectorRegistry())
    return director.dl.predictor.settings.time_scale


def test_up_predicts_its_pods_steps_at_their_time_scale() -> None:
    # Pods replaying 3x slower than their profile: a picker predicting profile seconds would drain every
    # queue 3x too fast (the benchmark measured this; PredictorSettings.time_scale).
    assert _predictor_time_scale(StackOptions(time_scale=3.0)) == 3.0
    assert _predictor_time_scale(StackOptions()) == 1.0


def test_a_config_file_that_sets_the_predictor_time_scale_wins(tmp_path: Path) -> None:
    cfg = tmp_path / "picker.yaml"
    cfg.write_text("scheduler: {predictor: {time_scale: 1.5, correction_window: 32}}\n")
    assert _predictor_time_scale(StackOptions(time_scale=3.0, config_file=str(cfg))) == 1.5
