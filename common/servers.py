"""Serving a Starlette app: bind the socket first, publish its port, then run uvicorn.

The gateway, the monitor and the controller all start this way. Binding here rather
than in uvicorn lets port 0 pick a free port whose number is known (logged and written
to a port file) before the first request can arrive. With TLS settings that carry a
certificate, the same socket serves HTTPS only (common/tls.py, docs/tls.md).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import uvicorn

from common.tls import TlsSettings, uvicorn_ssl_options


def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` and listening, inheritable by uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose
    # proto says TCP, and without it Nagle + delayed ACK add ~40 ms per response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def url_host(host: str) -> str:
    """``host`` as it appears in a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host else host


def write_port_file(path: str | Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically: readers never see a partial number."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


class _TlsServer(uvicorn.Server):
    """uvicorn's server, with idle connections aborted rather than closed on shutdown.

    Closing a TLS connection sends close_notify and waits for the peer's (asyncio: up
    to 30 s), and uvicorn waits for every connection: one idle keep-alive client (the
    controller's, the capture client's) would hold a stop for half a minute, past the
    platform's grace period. An idle connection has no request in flight, so aborting
    it loses nothing; busy ones still finish their response first.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Abort the idle connections, then shut down as uvicorn does."""
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if transport is not None and (cycle is None or cycle.response_complete):
                transport.abort()
        await super().shutdown(sockets)


def run_on_socket(
    app: Any, sock: socket.socket, tls: TlsSettings | None = None, **config: Any
) -> None:
    """Serve ``app`` with uvicorn on ``sock`` until SIGINT/SIGTERM; the socket is closed after.

    ``tls`` with a certificate and key: HTTPS only (a plain-HTTP client fails the
    handshake), and with a client CA only clients presenting a certificate it signed
    (mutual TLS); None or no certificate: plain HTTP. ``config`` goes to
    ``uvicorn.Config`` (log level, keep-alive, loop, http, ...).
    """
    ssl_options = uvicorn_ssl_options(tls) if tls is not None else {}
    server_class = _TlsServer if ssl_options else uvicorn.Server
    server = server_class(uvicorn.Config(app, access_log=False, **ssl_options, **config))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
