"""The gateway's capture client: queue, sample, deliver in batches, spool on trouble.

The gateway calls its `on_scored(model, version, request, predictions)` hook for
every successful scoring. :class:`CaptureClient` is that hook: it appends the
request to a bounded in-memory queue (O(1), no parsing, no I/O) and a background
thread batches records and POSTs them to the monitor's ``/ingest``. When the
monitor is down or slow, or the queue is full, records go to a durable SQLite
spool (:mod:`monitoring.capture.spool`) and are redelivered later, oldest first.
Nothing is dropped: ``stats()["records_dropped"]`` stays 0 unless the monitor
refuses a single record as malformed, and then the record is kept in the spool's
dead-letter table.

The client does not parse request bodies: a record carries the raw body and its
content type, and the monitor turns it into rows with :meth:`CaptureRecord.rows`,
exactly like the stock scorer reads it. That keeps the gateway's CPU free for
scoring, and a body the monitor cannot read becomes a counted schema violation
there rather than an error in the gateway.

``monitor_url`` may name several monitors, comma-separated (FLOWLINE_MONITOR_URL=
``http://127.0.0.1:8082,http://127.0.0.1:8083``): monitors sharing one PostgreSQL
store. A batch goes to the current one; on a connection error, a timeout or a 5xx
it goes at once to the next, which becomes current. Only when every monitor
fails is the batch spooled, as with one. A batch retried elsewhere after a lost
answer is stored once: the store deduplicates by record id.

Wire format of ``POST /ingest``::

    {"client": {"id": "...", "dropped": [{"model": m, "version": v, "records": n}]},
     "records": [<CaptureRecord.to_dict()>, ...]}
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import random
import ssl
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
from pydantic import BeforeValidator
from pydantic_settings import NoDecode

from common.settings import CommaList, EnvFloat, EnvInt, FlowlineBaseSettings, HomeSettings
from common.tls import TlsSettings, client_ssl_context
from monitoring.capture.record import (
    encode_record,
)
from monitoring.capture.spool import SPOOL_FILE, Spool, SpooledRecord
from monitoring.capture.token import TOKEN_ENV, client_token

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_BATCH_SIZE = 500
# A kill -9 of the gateway loses what waits in memory: records queued since the last
# flush (at most one interval, or one POST when that took longer) and a batch being
# sent. Issue 9 bounds that at 50 ms of traffic; measured with 50 ms it reached 50 ms
# (the POST adds to the interval), so 25 ms. The cost, 40 small POSTs a second instead
# of 5, is measured in benchmarks/results/monitoring_capture_kill.md.
DEFAULT_FLUSH_INTERVAL_S = 0.025
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_BACKOFF_S = 5.0

# --- sampling and switches --------------------------------------------------------------


@dataclass(frozen=True)
class SamplingPolicy:
    """Which share of each model's requests to capture (0 = off)."""

    default: float = 1.0
    per_model: Mapping[str, float] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()

    def rate(self, model: str) -> float:
        """The capture probability for ``model``."""
        if model in self.disabled or "*" in self.disabled:
            return 0.0
        return self.per_model.get(model, self.default)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SamplingPolicy:
        """FLOWLINE_CAPTURE_SAMPLE ("0.5" or "0.5,churn=0.1") and FLOWLINE_CAPTURE_DISABLED."""
        env = SamplingSettings.from_env(environ)
        default, per_model = env.capture_sample
        return cls(default, per_model, frozenset(env.capture_disabled))


def _sample_rates(value: Any) -> Any:
    """ "0.5,churn=0.1" -> (0.5, {"churn": 0.1}): a bare rate (or "*=rate") is the default."""
    if not isinstance(value, str):
        return value
    default = 1.0
    per_model: dict[str, float] = {}
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, rate_text = part.rpartition("=")
        try:
            rate = float(rate_text)
        except ValueError:
            raise ValueError(f"rates must be numbers: {part!r}") from None
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rates must be in [0, 1]: {part!r}")
        if sep and name.strip() not in ("", "*"):
            per_model[name.strip()] = rate
        else:
            default = rate
    return default, per_model


class SamplingSettings(FlowlineBaseSettings):
    """FLOWLINE_CAPTURE_SAMPLE (the default rate, then per-model rates) and
    FLOWLINE_CAPTURE_DISABLED (models not captured, ``*`` for all)."""

    # NoDecode: the value is this module's own syntax, not JSON.
    capture_sample: Annotated[
        tuple[float, dict[str, float]], NoDecode, BeforeValidator(_sample_rates)
    ] = (1.0, {})
    capture_disabled: CommaList = ()


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def monitor_urls(value: str) -> list[str]:
    """The monitor base URLs of a FLOWLINE_MONITOR_URL value: comma-separated, blanks
    and trailing slashes dropped (one URL is a list of one)."""
    return [part.strip().rstrip("/") for part in value.split(",") if part.strip()]


class CaptureTargetSettings(FlowlineBaseSettings):
    """FLOWLINE_MONITOR_URL: where captured requests go (one monitor URL, or several
    comma-separated ones to fail over between); unset or blank turns capture off."""

    monitor_url: Annotated[str, BeforeValidator(_stripped)] = ""


class CaptureSettings(HomeSettings):
    """How the capture client delivers (`client_from_env`; docs/monitoring.md).

    FLOWLINE_CAPTURE_SPOOL_DIR defaults to $FLOWLINE_HOME/capture-spool;
    FLOWLINE_INGEST_TOKEN, when unset, is read from $FLOWLINE_HOME/ingest-token.
    """

    capture_spool_dir: str = ""
    capture_queue: EnvInt = DEFAULT_QUEUE_SIZE
    capture_batch: EnvInt = DEFAULT_BATCH_SIZE
    capture_flush_s: EnvFloat = DEFAULT_FLUSH_INTERVAL_S
    capture_timeout_s: EnvFloat = DEFAULT_TIMEOUT_S
    ingest_token: str = ""


# --- the client -------------------------------------------------------------------------


def record_id(client_id: str, seq: int) -> str:
    """A capture record's id: the client's random prefix, then its clock-based ordering key.

    One client's ids sort in the order it made them, so the store's unique index
    on record ids grows at one end per client instead of at random pages.
    """
    return f"{client_id}-{seq:x}"


class _Seq:
    """Monotonic ordering keys that keep increasing across restarts (clock-based)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last


@dataclass
class _Stats:
    submitted: int = 0
    sampled_out: int = 0
    delivered: int = 0
    spooled: int = 0
    redelivered: int = 0
    delivery_failures: int = 0
    records_dropped: int = 0


class CaptureClient:
    """The gateway's `on_scored` hook: queue in memory, deliver in batches, spool on trouble."""

    def __init__(
        self,
        monitor_url: str,
        spool_dir: str | Path,
        *,
        sampling: SamplingPolicy | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        token: str | Callable[[], str | None] | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be >= 1")
        urls = monitor_urls(monitor_url)
        if not urls:
            raise ValueError("monitor_url names no monitor")
        self.ingest_urls = [url + "/ingest" for url in urls]
        self._current = 0  # the monitor batches go to until it fails
        self.sampling = sampling or SamplingPolicy()
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        self.client_id = uuid.uuid4().hex[:16]  # record ids: '<client_id>-<seq hex>'
        self.spool = Spool(Path(spool_dir) / SPOOL_FILE)
        self._spooled = self.spool.count()  # what a previous run left: redelivered first
        self._queue: deque[tuple[str, str, Any, Any]] = deque()
        self._pop_lock = threading.Lock()  # FIFO pops (sender vs. overflow spill)
        self._stats_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._seq = _Seq()
        self._stats = _Stats()
        self._dropped: Counter[tuple[str, str]] = Counter()
        self._failures = 0
        self._retry_at = 0.0
        # verify: an https monitor is checked against the system store, or against the
        # context client_from_env builds from FLOWLINE_TLS_* (trust, client certificate).
        self._http = httpx.Client(timeout=timeout_s, verify=verify)
        # The ingest token, or where to read it again after a refusal (a monitor
        # that created its token after this client started, or a new token).
        self._token_source = token if callable(token) else (lambda: token)
        self._token = self._token_source()
        self._auth_refused = False
        self._dead_now: set[str] = set()  # ids dead-lettered while posting the current batch
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- the hot path ---------------------------------------------------------------------

    def submit(self, model: str, version: str, request: Any, predictions: Any) -> None:
        """Queue one scored request; never blocks on the network, never raises."""
        try:
            rate = self.sampling.rate(model)
            if rate < 1.0 and (rate <= 0.0 or random.random() >= rate):
                self._stats.sampled_out += 1
                return
            self._queue.append((model, version, request, predictions))
            self._stats.submitted += 1
            size = len(self._queue)
            if size >= self.queue_size:
                self._spill_queue()  # amortised: one call in queue_size pays a batch write
            elif size >= self.batch_size:
                self._wake.set()
        except Exception:
            logger.exception("capture failed for %s/%s", model, version)
            self._count_dropped(model, version, 1)

    __call__ = submit

    async def on_scored(self, model: str, version: str, request: Any, predictions: Any) -> None:
        """Async form of :meth:`submit` for the gateway: runs on its event loop, no thread hop.

        Only a call that finds the queue full (monitor down and spilling) moves
        to a worker thread, because it writes the queue to disk.
        """
        if len(self._queue) + 1 >= self.queue_size:
            await asyncio.to_thread(self.submit, model, version, request, predictions)
        else:
            self.submit(model, version, request, predictions)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> CaptureClient:
        """Start the delivery thread (it first redelivers what a previous run spooled)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flowline-capture", daemon=True)
            self._thread.start()
            if self._spooled:
                self._wake.set()
        return self

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue and the spool are empty (delivered); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._queue and not self._spooled and self._idle.is_set():
                return True
            self._wake.set()
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop delivering; try one last delivery, spool whatever is left (kept for next start)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._spill_queue()
        deadline = time.monotonic() + timeout
        try:
            while self._spooled and time.monotonic() < deadline and self._retry_at == 0.0:
                if not self._deliver_spool():
                    break
        except Exception:
            logger.exception("capture: final delivery failed; records stay spooled")
        self._http.close()
        self.spool.close()

    @property
    def ingest_url(self) -> str:
        """The ingest URL batches go to now (the first one until it fails)."""
        return self.ingest_urls[self._current]

    def stats(self) -> dict[str, int]:
        """Counters: submitted, sampled_out, delivered, spooled, redelivered, ... (records)."""
        out = dict(self._stats.__dict__)
        out["queued"] = len(self._queue)
        out["spool_pending"] = self._spooled
        return out

    # --- the delivery thread -------------------------------------------------------------

    def _run(self) -> None:
        next_flush = time.monotonic()
        while not self._stop.is_set():
            # Flushes are paced from the start of the previous one, not from its end: a
            # record then waits in memory at most one interval, however long a POST took.
            self._wake.wait(max(0.0, next_flush - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            next_flush = time.monotonic() + self.flush_interval_s
            self._idle.clear()
            try:
                self._pump()
            except Exception:
                # The thread must outlive any surprise; records stay queued or spooled.
                logger.exception("capture delivery loop error")
                self._backoff()
            self._idle.set()

    def _pump(self) -> None:
        first = True
        while not self._stop.is_set():
            if time.monotonic() < self._retry_at:
                # The monitor is failing: keep memory small and records durable meanwhile.
                self._spill_queue()
                return
            if self._spooled:
                if not self._deliver_spool():
                    continue  # the backoff branch above spills the queue
                first = False
                continue
            # Spool empty: deliver from memory. After the first batch, go on only
            # while full batches wait, so steady traffic is not sent in tiny posts.
            if not first and len(self._queue) < self.batch_size:
                return
            batch = self._pop(self.batch_size)
            if not batch:
                return
            first = False
            self._dead_now.clear()
            if self._post(batch) == "retry":
                # What was set aside as refused stays in the dead letter, not queued again.
                kept = [r for r in batch if r.id not in self._dead_now]
                self.spool.put(kept)
                self._add_spooled(len(kept))

    def _deliver_spool(self) -> bool:
        batch = self.spool.peek(self.batch_size)
        if not batch:
            self._spooled = 0
            return True
        outcome = self._post(batch)
        if outcome == "retry":
            return False
        self.spool.delete(batch)
        with self._stats_lock:
            self._spooled = max(0, self._spooled - len(batch))
            if outcome == "ok":
                self._stats.redelivered += len(batch)
        return True

    def _pop(self, limit: int) -> list[SpooledRecord]:
        with self._pop_lock:
            items = []
            while self._queue and len(items) < limit:
                items.append(self._queue.popleft())
            # Keys are taken under the lock, so they follow queue order.
            keyed = [(self._seq.next(), item) for item in items]
        out = []
        for i, (seq, item) in enumerate(keyed, 1):
            out.append(self._encode(seq, item))
            if i % 32 == 0:
                # Let the gateway's event loop take the GIL now and then: a long
                # encoding run would otherwise delay answers by a switch interval (5 ms).
                time.sleep(0)
        return out

    def _spill_queue(self) -> None:
        while self._queue:
            batch = self._pop(self.batch_size * 4)
            if not batch:
                return
            self.spool.put(batch)
            self._add_spooled(len(batch))

    def _add_spooled(self, n: int) -> None:
        with self._stats_lock:
            self._spooled += n
            self._stats.spooled += n

    def _encode(self, seq: int, item: tuple[str, str, Any, Any]) -> SpooledRecord:
        model, version, request, predictions = item
        rid = record_id(self.client_id, seq)
        payload = encode_record(
            rid,
            model,
            version,
            getattr(request, "received_at", None) or time.time(),
            getattr(request, "content_type", None),
            getattr(request, "request_id", None),
            predictions,
            request.body,
            cached=bool(getattr(request, "cached", False)),
        )
        return SpooledRecord(seq, rid, payload)

    def _post(self, batch: list[SpooledRecord]) -> str:
        """Deliver one batch: "ok", "retry" (monitor unavailable) or "dropped" (refused)."""
        dropped = self._take_dropped_report()
        head = json.dumps({"id": self.client_id, "dropped": dropped}, separators=(",", ":"))
        records = b",".join(r.payload for r in batch)
        body = b'{"client":' + head.encode() + b',"records":[' + records + b"]}"
        headers = {"content-type": "application/json"}
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        answer, status, reason = self._post_anywhere(body, headers)
        if 200 <= status < 300:
            if self._failures:
                logger.warning("capture: monitor at %s reachable again", self.ingest_url)
            self._failures = 0
            self._retry_at = 0.0
            self._auth_refused = False
            with self._stats_lock:
                self._stats.delivered += len(batch)
            return "ok"
        self._restore_dropped_report(dropped)
        if status in (401, 403):
            # A credential problem, not a bad record: keep everything spooled, read
            # the token again and retry with backoff until the monitor takes it.
            if not self._auth_refused:
                logger.error(
                    "capture: monitor at %s refused the ingest token (HTTP %d); records stay "
                    "spooled until FLOWLINE_INGEST_TOKEN or $FLOWLINE_HOME/ingest-token match",
                    self.ingest_url,
                    status,
                )
            self._auth_refused = True
            self._token = self._token_source()
            with self._stats_lock:
                self._stats.delivery_failures += 1
            self._backoff()
            return "retry"
        if status in (400, 413, 422):
            refusal = _refusal(answer)
            if refusal.get("field") == "client" and dropped:
                # The drop report itself was refused: it is only counters, so it is
                # discarded (logged) rather than holding back the records.
                logger.error(
                    "capture: monitor refused the drop report %s: %s", dropped, refusal.get("error")
                )
                self._take_dropped_report()
                return self._post(batch)
            invalid = _invalid_indexes(refusal, len(batch))
            if invalid:
                # The monitor named the bad records: set exactly those aside, send the rest.
                for i in sorted(invalid):
                    self._dead_letter(batch[i], f"{reason}: {invalid[i]}")
                rest = [r for i, r in enumerate(batch) if i not in invalid]
                return self._post(rest) if rest else "dropped"
            # Refused as malformed or too large: split to isolate the bad record.
            if len(batch) > 1:
                mid = len(batch) // 2
                first, second = self._post(batch[:mid]), self._post(batch[mid:])
                return "retry" if "retry" in (first, second) else "ok"
            self._dead_letter(batch[0], reason)
            return "dropped"
        with self._stats_lock:
            self._stats.delivery_failures += 1
        # One warning per outage; the retries in between only at debug level.
        log = logger.warning if self._failures == 0 else logger.debug
        where = ", ".join(self.ingest_urls)
        log("capture: monitor at %s unavailable (%s); spooling to disk", where, reason)
        self._backoff()
        return "retry"

    def _post_anywhere(
        self, body: bytes, headers: dict[str, str]
    ) -> tuple[httpx.Response | None, int, str]:
        """POST to the current monitor, then to each other one while the answer is a
        connection error, a timeout or a 5xx: (answer, status, reason), status 0 when
        no monitor answered. The one that answers otherwise becomes current."""
        answer: httpx.Response | None = None
        status, reason = 0, "no monitor"
        count = len(self.ingest_urls)
        for step in range(count):
            index = (self._current + step) % count
            url = self.ingest_urls[index]
            try:
                answer = self._http.post(url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                answer, status, reason = None, 0, type(exc).__name__
            else:
                status, reason = answer.status_code, f"HTTP {answer.status_code}"
            if status and status < 500:
                if index != self._current:
                    logger.warning("capture: failing over from %s to %s", self.ingest_url, url)
                    self._current = index
                return answer, status, reason
            if count > 1:
                logger.debug("capture: monitor at %s unavailable (%s)", url, reason)
        return answer, status, reason

    def _dead_letter(self, record: SpooledRecord, reason: str) -> None:
        """Keep a record the monitor refused in the spool's dead-letter table, and count it."""
        message = "capture: monitor refused record %s (%s); kept in dead letter"
        logger.error(message, record.id, reason)
        self.spool.dead_letter([record], reason, time.time())
        self._dead_now.add(record.id)
        try:
            meta = json.loads(record.payload)
            self._count_dropped(str(meta.get("model")), str(meta.get("version")), 1)
        except ValueError:
            self._count_dropped("?", "?", 1)
        # A spooled record was removed by dead_letter; the caller's delete is a no-op.

    def _backoff(self) -> None:
        self._failures += 1
        delay = min(self.max_backoff_s, 0.1 * 2 ** min(self._failures, 10))
        self._retry_at = time.monotonic() + delay * (0.5 + random.random() / 2)

    def _count_dropped(self, model: str, version: str, n: int) -> None:
        with self._stats_lock:
            self._stats.records_dropped += n
            self._dropped[(model, version)] += n

    def _take_dropped_report(self) -> list[dict[str, Any]]:
        with self._stats_lock:
            report = [
                {"model": m, "version": v, "records": n} for (m, v), n in self._dropped.items()
            ]
            self._dropped.clear()
        return report

    def _restore_dropped_report(self, report: list[dict[str, Any]]) -> None:
        with self._stats_lock:
            for item in report:
                self._dropped[(item["model"], item["version"])] += item["records"]


def _refusal(answer: httpx.Response | None) -> dict[str, Any]:
    """The JSON body of a 4xx answer from the monitor, or {}."""
    if answer is None:
        return {}
    try:
        doc = answer.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _invalid_indexes(refusal: dict[str, Any], size: int) -> dict[int, str]:
    """Batch positions the monitor refused, with reasons; {} when it did not name them all."""
    items = refusal.get("invalid")
    if not isinstance(items, list) or not items or refusal.get("truncated"):
        return {}
    out: dict[int, str] = {}
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < size:
            return {}  # not an answer about this batch: fall back to splitting it
        out[index] = str(item.get("error"))[:500]
    return out


# --- wiring into the gateway ------------------------------------------------------------


def client_from_env(environ: Mapping[str, str] | None = None) -> CaptureClient | None:
    """A started :class:`CaptureClient` configured from FLOWLINE_* variables, or None.

    None when FLOWLINE_MONITOR_URL is unset or capture is disabled for every
    model (FLOWLINE_CAPTURE_DISABLED=*). See docs/monitoring.md for the variables.
    """
    # Read in this order, as always: with no monitor URL, or capture off for every
    # model, the other capture variables are not looked at (nor can they fail).
    url = CaptureTargetSettings.from_env(environ).monitor_url
    if not url:
        return None
    sampling = SamplingPolicy.from_env(environ)
    if "*" in sampling.disabled:
        return None
    env = CaptureSettings.from_env(environ)
    spool_dir = Path(env.capture_spool_dir or env.home / "capture-spool")
    if not env.capture_spool_dir and spool_dir.is_dir():
        spool_dir.chmod(0o700)  # flowline's own folder, maybe left looser by an older run
    token_env = {TOKEN_ENV: env.ingest_token}
    tls = TlsSettings.from_env(environ)
    # Without any FLOWLINE_TLS_* variable httpx keeps its own default trust, as before.
    uses_tls = tls.tls_ca is not None or tls.enabled
    client = CaptureClient(
        url,
        spool_dir.expanduser().resolve(),
        sampling=sampling,
        queue_size=env.capture_queue,
        batch_size=env.capture_batch,
        flush_interval_s=env.capture_flush_s,
        timeout_s=env.capture_timeout_s,
        token=lambda: client_token(env.home, token_env),
        verify=client_ssl_context(tls) if uses_tls else True,
    )
    return client.start()


def capture_hook_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """The gateway's ``on_scored`` hook (an async function), or None when capture is off.

    Use it as ``serve_gateway(..., on_scored=capture_hook_from_env())``. The
    client is closed at interpreter exit, which spools whatever is still queued
    so that the next start redelivers it.
    """
    client = client_from_env(environ)
    if client is None:
        return None
    atexit.register(client.close)
    return client.on_scored
