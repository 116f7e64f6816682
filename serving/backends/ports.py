"""Loopback ports for replicas, handed out once and taken back on stop."""

from __future__ import annotations

import threading

from common.processes import port_bindable

# A replica that loses its port to another process between our check and its own bind
# is retried on the next free port this many times.
PORT_ATTEMPTS = 3


class PortTaken(Exception):
    """The replica lost its port to another process before binding it."""


class PortPool:
    """Consecutive free ports from ``port_from``, each handed to one replica at a time."""

    def __init__(self, host: str, port_from: int) -> None:
        self.host = host
        self.port_from = port_from
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def take(self) -> int:
        """The lowest port nobody holds and that can be bound now."""
        with self._lock:
            port = self.port_from
            while port in self._used or not port_bindable(port, self.host):
                port += 1
            self._used.add(port)
            return port

    def hold(self, port: int) -> None:
        """Mark ``port`` as held: an adopted replica's, or one a stranger bound."""
        with self._lock:
            self._used.add(port)

    def release(self, port: int) -> None:
        """Give ``port`` back once its replica stopped."""
        with self._lock:
            self._used.discard(port)
