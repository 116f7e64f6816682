"""Keep every role of `flowline up` running: restart what exits, with capped backoff.

One crashed role must not stop the platform. The supervisor polls each role's process;
a role that exited is started again at once, and after a delay that doubles with each
further restart that did not last (0.5 s, 1 s, 2 s, ... capped at 30 s); the count
starts over once a restart has stayed up for a minute. Only the stop event (Ctrl-C or
SIGTERM) ends the loop; stopping the platform is the caller's job.

Roles live in their own process groups and scoring replicas in theirs, so a restarted
controller adopts the replicas it left and the gateway keeps serving meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import requests

from common.processes import ManagedProcess
from common.tls import TlsSettings, client_tls

# Detection and the health checks of a restarting role each wait up to one poll.
POLL_SECONDS = 0.1
START_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th restart in a row of a role that keeps exiting."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    # A restart that stayed up this long was a success: the next crash starts over.
    reset_after: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (1-based): none for the
        first (one crash costs no extra outage), then ``first``, doubling, capped."""
        if attempt <= 1:
            return 0.0
        return min(self.cap, self.first * self.factor ** (attempt - 2))


class Supervised(Protocol):
    """What the supervisor needs from the platform."""

    processes: list[tuple[str, ManagedProcess]]

    def respawn(self, name: str) -> ManagedProcess:
        """Start role ``name`` again, without waiting for it to be ready."""
        ...

    def health_url(self, name: str) -> str:
        """The URL that answers 200 once role ``name`` is ready."""
        ...

    def wake_controller(self) -> None:
        """Ask the controller for a reconcile pass now."""
        ...


@dataclass
class _Role:
    name: str
    process: ManagedProcess
    state: str = "running"  # running | waiting (until ``due``) | starting
    attempt: int = 0
    due: float = 0.0
    since: float = field(default_factory=time.monotonic)
    down_since: float = 0.0


def healthy(url: str, tls: TlsSettings | None = None, timeout: float = 1.0) -> bool:
    """Whether ``url`` answers 200; an https one verified (and, under mutual TLS,
    presented a client certificate) as ``tls`` says; no TLS settings: requests' defaults."""
    verify, cert = client_tls(tls) if tls is not None else (True, None)
    try:
        return requests.get(url, timeout=timeout, verify=verify, cert=cert).status_code == 200
    except requests.RequestException:
        return False


class Supervisor:
    """Restarts exited roles of a platform until ``stop`` is set."""

    def __init__(
        self,
        platform: Supervised,
        say: Callable[[str], None],
        backoff: Backoff | None = None,
        start_timeout: float = START_TIMEOUT_SECONDS,
        tls: TlsSettings | None = None,
    ) -> None:
        self.platform = platform
        self.tls = tls  # how the health checks of restarted roles reach https ones
        self.say = say
        self.backoff = backoff or Backoff()
        self.start_timeout = start_timeout
        self.roles = [_Role(name, process) for name, process in platform.processes]

    def run(self, stop: threading.Event) -> None:
        """Supervise until ``stop`` is set."""
        while not stop.wait(POLL_SECONDS):
            for role in self.roles:
                self._step(role, time.monotonic())

    def _step(self, role: _Role, now: float) -> None:
        if role.state == "running" and not role.process.alive():
            if now - role.since >= self.backoff.reset_after:
                role.attempt = 0
            role.down_since = now
            self._schedule(role, now, f"exited unexpectedly ({_exit(role.process)})")
        # Not elif: a first restart is due at once, so it starts in the pass that saw
        # the exit rather than one poll later (the gateway's outage is this whole path).
        if role.state == "waiting" and now >= role.due:
            try:
                role.process = self.platform.respawn(role.name)
            except OSError as exc:  # no fork, no disk for the log: try again later
                self._schedule(role, now, f"could not be started ({exc})")
                return
            role.state, role.since = "starting", now
        elif role.state == "starting":
            if not role.process.alive():
                self._schedule(role, now, f"failed to restart ({_exit(role.process)})")
            elif healthy(self.platform.health_url(role.name), self.tls):
                role.state, role.since = "running", time.monotonic()
                self.say(
                    f"{role.name} is back (pid {role.process.pid}), "
                    f"{role.since - role.down_since:.1f}s after it went down"
                )
                if role.name.startswith("gateway"):
                    # A new gateway starts with no routes; the controller pushes them.
                    self.platform.wake_controller()
            elif now - role.since > self.start_timeout:
                role.process.stop(grace=5.0)
                self._schedule(role, now, f"not healthy within {self.start_timeout:.0f}s")

    def _schedule(self, role: _Role, now: float, why: str) -> None:
        role.attempt += 1
        delay = self.backoff.delay(role.attempt)
        role.state, role.due = "waiting", now + delay
        tail = role.process.tail(3)
        self.say(
            f"{role.name} {why}; restarting in {delay:.1f}s (restart {role.attempt})"
            + (f"; last log lines: {tail}" if tail else "")
        )


def _exit(process: ManagedProcess) -> str:
    code = process.popen.returncode if process.popen is not None else None
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit code {code}"
