"""Serving a Starlette app: bind the socket first, publish its port, then run uvicorn.

The gateway and the monitor both start this way. Binding here rather than in
uvicorn lets port 0 pick a free port whose number is known (logged and written to a
port file) before the first request can arrive.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import uvicorn


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


def run_on_socket(app: Any, sock: socket.socket, **config: Any) -> None:
    """Serve ``app`` with uvicorn on ``sock`` until SIGINT/SIGTERM; the socket is closed after.

    ``config`` goes to ``uvicorn.Config`` (log level, keep-alive, loop, http, ...).
    """
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, **config))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
