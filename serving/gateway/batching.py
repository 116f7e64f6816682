"""Adaptive batching: coalesce what queues up while a deployment's replicas are busy.

An idle deployment forwards a request at once, unchanged, so a lone client
pays no batching delay. Only while every backend slot (`calls_per_replica`
per healthy replica) is busy do requests queue; when a slot frees, the queued
requests that share a batch key (`serving.gateway.wire`) go out as one merged
call of at most `max_batch_size` rows, and the predictions are split back.
A request that has queued for `max_wait_ms` is sent even if no slot is free,
so one slow backend call cannot hold the queue indefinitely.

Fuller batches: under steady load the callers split into two groups that take turns
(the ones answered by a merged call come back while the slot already carries the
others), so each call carries half of what it could. After a merged call the freed slot
is therefore held for up to `hold_ms` (and never longer than the call just made)
while the callers it answered send their next requests; it is released as soon as the
queue holds as many rows as are expected back, or `max_batch_size`. A lone client never
makes a merged call, so it never meets the hold.

If a merged call fails or its answer is not row-aligned, each request is sent
again on its own, so every caller gets exactly what the stock scorer gives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from serving.deployment import BatchingSettings
from serving.gateway.wire import (
    JSON_MIME,
    BatchSchema,
    TabularRequest,
    merge_body,
    split_predictions,
)

logger = logging.getLogger(__name__)

# The hold lasts at most this share of the merged call just made. Measured (demo model,
# 64 clients, 2 cores): at 0.5 with a 2 ms cap the hold expired before any caller was back
# (31.8 rows per call, as with no hold), since the gateway must first write the answers
# it just split; at 1.0 with 10 ms, 49.6 rows per call and 1.7x the rps.
HOLD_FRACTION = 1.0


@dataclass(slots=True)
class Outcome:
    """The answer one caller gets."""

    status: int
    body: bytes
    content_type: str | None
    gateway_error: bool = False
    predictions: list[Any] | None = None  # set when the gateway already decoded them
    batch_size: int = 1  # requests served by the backend call that produced this answer


Send = Callable[[bytes, str | None, str], Awaitable[Outcome]]
"""Forward one body as is: send(body, content_type, call_kind) -> Outcome."""


@dataclass(slots=True)
class _Pending:
    item: TabularRequest
    body: bytes
    content_type: str | None
    future: asyncio.Future[Outcome]
    enqueued_at: float


class AdaptiveBatcher:
    """Per-deployment queue that merges concurrent tabular requests."""

    def __init__(
        self,
        settings: BatchingSettings,
        schema: BatchSchema,
        send: Send,
        slots: Callable[[], int],
        observe_batch: Callable[[int, int], None],
        label: str,
    ) -> None:
        self.settings = settings
        self.schema = schema
        self._send = send
        self._slots = slots
        self._observe_batch = observe_batch  # (requests, rows) of each merged call
        self._label = label
        self._queue: list[_Pending] = []
        self._busy = 0
        self._timer: asyncio.TimerHandle | None = None
        self._hold: asyncio.TimerHandle | None = None
        self._hold_rows = 0  # queued rows that end the hold early
        self._tasks: set[asyncio.Task[None]] = set()
        self.disabled_reason: str | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for a backend slot."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """True when a request would be sent at once (nothing queued, a slot free)."""
        return not self._queue and self._busy < self._slots()

    async def send_alone(self, body: bytes, content_type: str | None) -> Outcome:
        """Send one request unchanged in a free slot (check `idle` first, without awaiting)."""
        self._busy += 1
        try:
            return await self._send(body, content_type, "single")
        finally:
            self._busy -= 1
            self._pump()

    async def submit(self, item: TabularRequest, body: bytes, content_type: str | None) -> Outcome:
        """Score one request, alone if a slot is free, else merged with its queue-mates."""
        if self.idle:
            return await self.send_alone(body, content_type)
        loop = asyncio.get_running_loop()
        pending = _Pending(item, body, content_type, loop.create_future(), loop.time())
        self._queue.append(pending)
        if self._hold is not None and self._queued_rows() >= self._hold_rows:
            self._release_hold()
        self._arm_timer(loop)
        return await pending.future

    # --- scheduling ------------------------------------------------------------------------

    def _queued_rows(self) -> int:
        return sum(len(p.item.rows) for p in self._queue)

    def _hold_slot(self, answered_rows: int, call_s: float) -> bool:
        """Keep the slot just freed for the callers coming back; False if not worth it."""
        cap_ms = min(self.settings.hold_ms, self.settings.max_wait_ms)
        hold_s = min(cap_ms / 1000.0, call_s * HOLD_FRACTION)
        target = min(self.settings.max_batch_size, self._queued_rows() + answered_rows)
        if hold_s <= 0 or self._hold is not None or self._queued_rows() >= target:
            return False
        self._busy += 1
        self._hold_rows = target
        self._hold = asyncio.get_running_loop().call_later(hold_s, self._release_hold)
        return True

    def _release_hold(self) -> None:
        if self._hold is None:
            return
        self._hold.cancel()
        self._hold = None
        self._busy -= 1
        self._pump()

    def _pump(self) -> None:
        while self._queue and self._busy < self._slots():
            batch = self._take_batch()
            if batch:
                self._launch(batch)

    def _take_batch(self) -> list[_Pending]:
        # Callers that went away (cancelled futures) are dropped, not sent.
        self._queue = [p for p in self._queue if not p.future.done()]
        if not self._queue:
            return []
        head = self._queue[0]
        key, limit = head.item.key, self.settings.max_batch_size
        batch: list[_Pending] = []
        rest: list[_Pending] = []
        rows = 0
        for pending in self._queue:
            size = len(pending.item.rows)
            if pending.item.key == key and rows + size <= limit:
                batch.append(pending)
                rows += size
            else:
                rest.append(pending)
        self._queue = rest
        return batch

    def _launch(self, batch: list[_Pending]) -> None:
        self._busy += 1
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None or not self._queue:
            return
        wait_s = self.settings.max_wait_ms / 1000.0
        delay = max(0.0, self._queue[0].enqueued_at + wait_s - loop.time())
        self._timer = loop.call_later(delay, self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        wait_s = self.settings.max_wait_ms / 1000.0
        now = loop.time()
        # Whatever has waited long enough goes now, over the slot limit if need be.
        while self._queue and now - self._queue[0].enqueued_at >= wait_s - 1e-4:
            batch = self._take_batch()
            if batch:
                self._launch(batch)
        self._arm_timer(loop)

    # --- backend calls ---------------------------------------------------------------------

    async def _run(self, batch: list[_Pending]) -> None:
        started = asyncio.get_running_loop().time()
        try:
            if len(batch) == 1:
                only = batch[0]
                _resolve(only, await self._send(only.body, only.content_type, "single"))
            else:
                await self._run_merged(batch)
        except asyncio.CancelledError:
            for pending in batch:
                pending.future.cancel()
            raise
        except Exception as exc:  # never leave a caller waiting forever
            logger.exception("batch for %s failed", self._label)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self._busy -= 1
            elapsed = asyncio.get_running_loop().time() - started
            rows = sum(len(p.item.rows) for p in batch)
            if len(batch) == 1 or not self._hold_slot(rows, elapsed):
                self._pump()

    async def _run_merged(self, batch: list[_Pending]) -> None:
        items = [p.item for p in batch]
        sizes = [len(i.rows) for i in items]
        self._observe_batch(len(batch), sum(sizes))
        merged = await self._send(merge_body(items), JSON_MIME, "batch")
        if merged.gateway_error:
            # No replica reachable or timed out: sending each again would fail alike.
            for pending in batch:
                _resolve(pending, merged)
            return
        if merged.status == 200:
            parts = split_predictions(merged.body, sizes)
            if parts is not None:
                for pending, (body, predictions) in zip(batch, parts, strict=True):
                    _resolve(
                        pending,
                        Outcome(200, body, merged.content_type, False, predictions, len(batch)),
                    )
                return
            self.disabled_reason = "the model's predictions are not row-aligned"
            logger.warning("batching disabled for %s: %s", self._label, self.disabled_reason)
        # The merged call failed (a bad request in the batch, most likely): send each
        # request alone so every caller gets the stock scorer's answer to its own body.
        outcomes = await asyncio.gather(
            *(self._send(p.body, p.content_type, "fallback") for p in batch)
        )
        for pending, outcome in zip(batch, outcomes, strict=True):
            _resolve(pending, outcome)


def _resolve(pending: _Pending, outcome: Outcome) -> None:
    if not pending.future.done():
        pending.future.set_result(outcome)
