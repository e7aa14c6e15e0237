"""Which prefill pods this sidecar may contact (nothing a client sends can pick a destination).

Two ways for an address to be trusted, checked in this order:

1. The allow list: addresses given with ``--prefill-pod`` plus those in ``--prefill-pods-file`` (one
   ``host:port`` per line, ``#`` comments). The file is re-read when its modification time changes
   (checked at most once a second), so a controller or the picker's config can refresh it without a
   restart.
2. A picker signature, only when a shared secret is configured (``--picker-secret-file``): header
   ``x-kvswitch-prefill-signature: <unix-seconds>.<hex HMAC-SHA256(secret,
   "<unix-seconds>\\n<x-request-id>\\n<host:port>")>``,
   accepted within ``max_skew_s`` of now. It binds the target to one request id and a short time window,
   so a captured signature cannot steer other requests elsewhere.

Anything else is refused before any connection is made.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "x-kvswitch-prefill-signature"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class AddressError(ValueError):
    """An ``x-prefiller-host-port`` value that is not a plain ``host:port``."""


def normalize_address(value: str) -> str:
    """``host:port`` in one canonical spelling; rejects schemes, paths, user info and bad ports."""
    text = value.strip()
    if not text or any(c in text for c in "/@?#, \t") or len(text) > 300:
        raise AddressError(f"prefill address {value!r} is not host:port")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise AddressError(f"prefill address {value!r} is not [ipv6]:port")
        try:
            host = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            raise AddressError(f"prefill address {value!r} has a bad IPv6 host") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise AddressError(f"prefill address {value!r} is not host:port")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            host = host.lower()
            if not _HOSTNAME.match(host):
                raise AddressError(f"prefill address {value!r} has a bad host") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"prefill address {value!r} has a bad port")
    return f"{host}:{int(port)}"


def sign(secret: bytes, request_id: str, target: str, now: float | None = None) -> str:
    """The signature header value the picker sets (exposed for the picker and for tests)."""
    ts = str(int(time.time() if now is None else now))
    mac = hmac.new(secret, f"{ts}\n{request_id}\n{normalize_address(target)}".encode(), hashlib.sha256)
    return f"{ts}.{mac.hexdigest()}"


class PrefillAllowList:
    """The set of prefill pods this decode pod may send prefill legs to."""

    def __init__(
        self,
        static: Iterable[str] = (),
        file: str | os.PathLike[str] | None = None,
        secret: bytes | None = None,
        max_skew_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        reload_interval_s: float = 1.0,
    ) -> None:
        self._static = frozenset(normalize_address(a) for a in static)
        self._file = Path(file) if file else None
        self._file_entries: frozenset[str] = frozenset()
        self._file_mtime: float | None = None
        self._next_check = 0.0
        self._secret = secret or None
        self._max_skew_s = max_skew_s
        self._clock = clock
        self._reload_interval_s = reload_interval_s
        if self._file is not None:
            self._reload(force=True)

    @property
    def addresses(self) -> frozenset[str]:
        self._reload()
        return self._static | self._file_entries

    def check(self, target: str, request_id: str, signature: str | None) -> str | None:
        """None when ``target`` (normalized) may be contacted, else the reason it may not."""
        if target in self.addresses:
            return None
        if self._secret is None:
            return "it is not in this sidecar's prefill allow list"
        if not signature:
            return "it is not in this sidecar's prefill allow list and the request carries no picker signature"
        if not self._signature_ok(target, request_id, signature):
            return "it is not in this sidecar's prefill allow list and the picker signature is invalid or expired"
        return None

    def _signature_ok(self, target: str, request_id: str, signature: str) -> bool:
        ts, _, mac = signature.partition(".")
        if not ts.isdigit() or not mac:
            return False
        if abs(self._clock() - int(ts)) > self._max_skew_s:
            return False
        if self._secret is None:
            return False
        expected = hmac.new(self._secret, f"{ts}\n{request_id}\n{target}".encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, mac.lower())

    def _reload(self, force: bool = False) -> None:
        if self._file is None:
            return
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + self._reload_interval_s
        try:
            mtime = self._file.stat().st_mtime_ns
        except OSError as exc:
            if force:
                raise ValueError(f"prefill pods file {self._file}: {exc.strerror}") from None
            log.warning("prefill pods file %s unreadable (%s); keeping %d entries",
                        self._file, exc, len(self._file_entries))
            return
        if mtime == self._file_mtime:
            return
        entries = set()
        for n, line in enumerate(self._file.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                entries.add(normalize_address(line))
            except AddressError as exc:
                if force:
                    raise ValueError(f"{self._file}:{n}: {exc}") from None
                log.warning("%s:%d: %s (line ignored)", self._file, n, exc)
        self._file_entries = frozenset(entries)
        self._file_mtime = mtime
