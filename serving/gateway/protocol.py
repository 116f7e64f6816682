"""uvicorn's httptools protocol with bounded request heads.

uvicorn waits for a request head (request line + headers) for as long as the
client likes and buffers it without limit: a slowloris client can hold
connections and memory forever. This subclass adds, per request head:

* a deadline (`header_timeout_s`, counted from the connection or, on a
  kept-alive connection, from the head's first byte): past it the client gets
  408 and the connection is closed;
* a size limit (`max_header_bytes`): a larger head gets 431 and the connection
  is closed.

Both answers carry MLflow's error body. The body has its own deadline in the
app (`Gateway.read_body`), so neither phase can hold a scoring slot.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.gateway import errors

logger = logging.getLogger(__name__)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that refuses slow (408) and oversized (431) request heads."""

    max_header_bytes = 64 * 1024
    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the first head's deadline as soon as the connection exists."""
        self._head_bytes = 0
        self._in_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the head deadline with the connection."""
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse as usual, then count what is still part of an unfinished head."""
        was_in_head = self._in_head
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        # A head that began inside this chunk counts the whole chunk (an upper bound,
        # off only for pipelined requests; the parser does not tell the offset).
        self._head_bytes = self._head_bytes + len(data) if was_in_head else len(data)
        if self._head_bytes > self.max_header_bytes:
            self._refuse_large_head()

    def on_message_begin(self) -> None:
        """A new request head starts: count and time it from here."""
        super().on_message_begin()
        if self._refused:
            return
        if not self._in_head:
            self._in_head = True
            self._head_bytes = 0
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        """The head is complete: check its size (it may have come in one chunk), then
        hand the request to the app."""
        if self._refused:
            return
        self._in_head = False
        self._cancel_head_timer()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:
            self._refuse_large_head()
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        """Body bytes of a request that was refused are dropped."""
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """Nothing to complete for a refused request."""
        if not self._refused:
            super().on_message_complete()

    # --- internals -----------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(
                408,
                errors.DEADLINE_EXCEEDED,
                f"The request head was not received within {self.header_timeout_s:g} s.",
            )

    def _refuse_large_head(self) -> None:
        self._refuse(
            431,
            errors.REQUEST_LIMIT_EXCEEDED,
            f"Request headers exceed the limit of {self.max_header_bytes} bytes.",
        )

    def _refuse(self, status: int, error_code: str, message: str) -> None:
        """Answer `status` with MLflow's error body and close the connection."""
        # The parser may still call back for the rest of the chunk: ignore all of it.
        self._refused = True
        self._cancel_head_timer()
        logger.info("closing a connection from %s: %s", self.client, message)
        body = errors.error_body(error_code, message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def bounded_protocol(max_header_bytes: int, header_timeout_s: float) -> type[Any]:
    """A `BoundedHttpToolsProtocol` subclass with these limits (uvicorn takes a class)."""
    return type(
        "BoundedHttpToolsProtocol",
        (BoundedHttpToolsProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s},
    )
