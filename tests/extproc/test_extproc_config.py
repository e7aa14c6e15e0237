"""Configuration: defaults without a file; bad keys and values named in the error."""

from __future__ import annotations

import pytest

from extproc.config import ConfigError, config_from_dict, load_config, parse_endpoint_flag
from extproc.serve import main as serve_main


def test_defaults_without_file():
    c = load_config(None)
    assert (c.server.grpc_port, c.server.metrics_port, c.server.body_limit_bytes) == (9002, 9090, 8 * 1024 * 1024)
    assert c.server.debug_headers is False and c.endpoints == []


def test_full_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("server: {grpc_port: 1234, debug_headers: true, model_rewrite: {a: b}}\n"
                 "endpoints:\n  - {address: '10.0.0.1:8000', role: prefill, accelerator: H200, labels: {z: '1'}}\n"
                 "scheduler: {plugins: []}\n")
    c = load_config(str(p))
    assert c.server.grpc_port == 1234 and c.server.model_rewrite == {"a": "b"}
    ep = c.endpoint_objects()[0]
    assert ep.role.value == "prefill" and ep.accelerator == "H200" and ep.labels == {"z": "1"}
    assert c.scheduler == {"plugins": []}


@pytest.mark.parametrize("raw, needle", [
    ({"server": {"grpc_prot": 1}}, "grpc_prot"),
    ({"server": {"grpc_port": "x"}}, "grpc_port"),
    ({"server": {"grpc_port": 70000}}, "server.grpc_port"),
    ({"server": {"body_limit_bytes": 0}}, "server.body_limit_bytes"),
    ({"endpoints": [{"address": "nope"}]}, "endpoints[0].address"),
    ({"endpoints": [{"address": "1.1.1.1:1", "role": "boss"}]}, "role"),
    ({"endpoints": [{"address": "1.1.1.1:1"}, {"address": "1.1.1.1:1"}]}, "endpoints[1].address"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_config_names_the_key(raw, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    assert needle in str(e.value)


def test_endpoint_flag():
    ep = parse_endpoint_flag("10.0.0.1:8000,role=decode,accelerator=A100,label.zone=a")
    assert (ep.address, ep.role, ep.accelerator, ep.labels) == ("10.0.0.1:8000", "decode", "A100", {"zone": "a"})
    with pytest.raises(ConfigError):
        parse_endpoint_flag("10.0.0.1:8000,colour=red")


def test_serve_rejects_bad_file(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("server: {nope: 1}\n")
    assert serve_main(["--config", str(p)]) == 2
    assert "nope" in capsys.readouterr().err
