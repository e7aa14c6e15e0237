"""`kvswitch serve` with a bad configuration: one line naming the key, exit status 2, nothing started."""

from __future__ import annotations

import pytest

from extproc.serve import main


@pytest.mark.parametrize("config, flags, names", [
    ("scheduler:\n  colour: blue\n", [], "scheduler.colour: unknown key"),
    ("scheduler:\n  scorers: [{type: queue, weight: heavy}]\n", [], "scheduler.scorers[0].weight: expected a number"),
    ("scheduler:\n  profile: fastest\n", [], "scheduler.profile: unknown profile 'fastest'"),
    ("server:\n  grpc_port: 70000\n", [], "server.grpc_port: 70000 is not a port number"),
    ("endpoints:\n  - {address: 10.0.0.1:8000, accelerator: TPU}\n", [], "endpoints[0]: unknown accelerator 'TPU'"),
    (None, ["--endpoint", "10.0.0.1"], "--endpoint '10.0.0.1'"),
    (None, ["--endpoint", "10.0.0.1:8000,role=leader"], "--endpoint '10.0.0.1:8000,role=leader'"),
    (None, ["--endpoint", "10.0.0.1:8000,colour"], "option 'colour' must be key=value"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, config, flags, names):
    args = ["--port", "0", "--metrics-port", "-1", *flags]
    if config is not None:
        path = tmp_path / "picker.yaml"
        path.write_text(config)
        args += ["--config", str(path)]
    assert main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvswitch serve: "), err
    assert names in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
