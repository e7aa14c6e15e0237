"""The real-vLLM test server's start-up: a port taken between picking it and vLLM binding it relaunches on
fresh ports; any other start-up failure raises with the log. A small Python process stands in for vLLM here:
what is under test is the harness's own relaunch rule, not vLLM (the e2e suite starts the real one)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from e2e.vllmcpu.server import PORT_CLASH_RELAUNCHES, VllmServer

# Exits 1 with vLLM's ZMQ message while the marker file holds fewer than CLASHES lines, then serves /health.
_STAND_IN = textwrap.dedent("""
    import http.server, sys
    port, marker, clashes, message = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with open(marker, "a+") as f:
        f.seek(0)
        tries = len(f.read().splitlines())
        f.write(f"{port}\\n")
    if tries < clashes:
        print(message, flush=True)
        sys.exit(1)
    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
""")


class _StandIn(VllmServer):
    clashes: int = 0
    message: str = "zmq.error.ZMQError: Address already in use (addr='tcp://*:35837')"

    def command(self) -> list[str]:
        marker = str(Path(self.model_dir) / "launches")
        return [sys.executable, "-c", _STAND_IN, str(self.port), marker, str(self.clashes), self.message]


def _server(tmp_path: Path, clashes: int, message: str | None = None, **kw) -> _StandIn:
    srv = _StandIn(tmp_path, start_timeout=30, **kw)
    srv.clashes = clashes
    if message is not None:
        srv.message = message
    return srv


def _launch_ports(tmp_path: Path) -> list[int]:
    return [int(x) for x in (tmp_path / "launches").read_text().split()]


def test_a_taken_port_relaunches_on_fresh_ports_and_the_server_comes_up(tmp_path: Path):
    srv = _server(tmp_path, clashes=PORT_CLASH_RELAUNCHES)
    try:
        srv.start()
        assert srv.alive() and srv.port_clash_relaunches == PORT_CLASH_RELAUNCHES
        ports = _launch_ports(tmp_path)
        assert len(ports) == PORT_CLASH_RELAUNCHES + 1 and ports[-1] == srv.port
        assert len(set(ports)) > 1  # fresh ports, not the taken one again
        assert srv.kv_events_port > 0
    finally:
        srv.stop()
    assert not srv.alive()


def test_more_clashes_than_relaunches_raise_with_the_log(tmp_path: Path):
    srv = _server(tmp_path, clashes=PORT_CLASH_RELAUNCHES + 1)
    with pytest.raises(RuntimeError, match="Address already in use"):
        srv.start()
    assert len(_launch_ports(tmp_path)) == PORT_CLASH_RELAUNCHES + 1 and not srv.alive()


def test_any_other_start_up_failure_raises_at_once(tmp_path: Path):
    srv = _server(tmp_path, clashes=1, message="RuntimeError: Engine core initialization failed")
    with pytest.raises(RuntimeError, match="Engine core initialization failed"):
        srv.start()
    assert len(_launch_ports(tmp_path)) == 1 and srv.port_clash_relaunches == 0


def test_ports_the_caller_chose_are_not_changed_behind_its_back(tmp_path: Path):
    from e2e.support.ports import free_port

    port = free_port()
    srv = _server(tmp_path, clashes=1, port=port)
    with pytest.raises(RuntimeError, match="Address already in use"):
        srv.start()
    assert _launch_ports(tmp_path) == [port]
