"""Envoy's start-up (``EnvoyChild.start``, what ``kvswitch up`` and the end-to-end tests run): a port taken
between picking it and Envoy binding it (this machine is shared) starts Envoy again on fresh ones; a port that
was named, or a failure of any other kind, raises at once with Envoy's log. The real Envoy binary runs here
(the 'local' extra that `make test` installs): what breaks is its bind, so nothing stands in for it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import pytest

from e2e.support.envoy import EnvoyProcess
from e2e.support.ports import free_port
from extproc.envoyconfig.builder import EnvoyConfigOptions


@contextmanager
def _listening(port: int) -> Iterator[socket.socket]:
    """Hold ``port`` as another process would: bound and listening, so Envoy's bind fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


def _envoy(**ports: int) -> EnvoyProcess:
    """Envoy without ext_proc in front of one (dead) endpoint: its start-up needs no picker. Counts launches."""
    envoy = EnvoyProcess(EnvoyConfigOptions(ext_proc=False, endpoints=[f"127.0.0.1:{free_port()}"], **ports))
    envoy.launches = 0  # type: ignore[attr-defined]
    launch = envoy.child._launch

    def counted() -> None:
        envoy.launches += 1  # type: ignore[attr-defined]
        launch()

    envoy.child._launch = counted  # type: ignore[method-assign]
    return envoy


async def _admin_ready(envoy: EnvoyProcess) -> bool:
    async with aiohttp.ClientSession() as s, s.get(f"{envoy.admin_url}/ready") as r:
        return r.status == 200


@pytest.mark.parametrize("taken", ["listen_port", "admin_port"])
async def test_a_picked_port_taken_before_the_bind_starts_envoy_again_on_fresh_ones(taken: str):
    envoy = _envoy()
    lost = getattr(envoy.opts, taken)
    try:
        with _listening(lost):
            await envoy.start()
            assert envoy.launches == 2  # type: ignore[attr-defined]
            assert getattr(envoy.opts, taken) != lost
            assert await _admin_ready(envoy)
    finally:
        await envoy.stop()
    assert envoy.child.proc is None


async def test_a_named_port_is_kept_and_its_clash_raises_with_the_log():
    port = free_port()
    envoy = _envoy(listen_port=port)
    try:
        with _listening(port), pytest.raises(RuntimeError, match="Address already in use"):
            await envoy.start()
        assert envoy.opts.listen_port == port and envoy.launches == 1  # type: ignore[attr-defined]
    finally:
        await envoy.stop()
    assert envoy.child.proc is None


async def test_a_failure_of_another_kind_is_not_retried():
    envoy = _envoy()
    envoy.opts.route_timeout_s = -1.0  # Envoy rejects a negative duration in its bootstrap
    try:
        with pytest.raises(RuntimeError, match="envoy exited"):
            await envoy.start()
        assert envoy.launches == 1  # type: ignore[attr-defined]
    finally:
        await envoy.stop()
    assert envoy.child.proc is None
