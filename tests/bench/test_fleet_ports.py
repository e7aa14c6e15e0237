"""The simulated fleet binds its ports only once it runs (e2e/bench/fleet.py): when another process has taken
one of them first, the start that fails with EADDRINUSE is made again on fresh ports."""

import socket

import e2e.bench.fleet as fleet_module
from e2e.bench.fleet import FleetSpec, SimFleetProcess


def test_fleet_starts_again_on_fresh_ports_when_a_port_was_taken(tmp_path, monkeypatch):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    real = fleet_module.free_port_range
    picks: list[int] = []

    def pick(n: int) -> int:  # the first range holds a port another process has bound since it was picked
        picks.append(n)
        return taken if len(picks) == 1 else real(n)

    monkeypatch.setattr(fleet_module, "free_port_range", pick)
    fleet = SimFleetProcess(FleetSpec(pods=1), tmp_path)
    try:
        fleet.start(timeout=60)
        assert fleet.starts == 2 and fleet.base_port != taken
        assert "address already in use" in (tmp_path / "fleet-1.log").read_text()
        assert fleet.proc is not None and fleet.proc.alive
    finally:
        fleet.stop()
        held.close()
