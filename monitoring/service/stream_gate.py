"""Which new (model, version) streams the monitor takes on.

Every stream costs the monitor for good: Prometheus series, a detector query
per pass, a row in /drift. So a record that would open a new stream is
accepted only when

* the batch opens at most :data:`MAX_NEW_STREAMS_PER_BATCH` streams (else the
  whole batch gets 422 without naming records, and the capture client splits it);
* the monitor holds fewer than ``max_streams`` streams
  (FLOWLINE_MONITOR_MAX_STREAMS);
* the version exists in the MLflow registry, when one is configured and answers.
  A registry that cannot be reached (or refuses the monitor's credentials) does
  not stop capture: the stream is taken on and the outage logged, so monitoring
  keeps working through a registry outage while the cap still bounds it.

The bound is on the monitor as a whole, not per ``client.id``: that id is
chosen by the sender, so a per-id bound would bound nothing; the credential
(:mod:`monitoring.capture.token`) is what identifies a client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from monitoring.service.ingest_checks import IngestRefused, StreamKey

logger = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 256
MAX_NEW_STREAMS_PER_BATCH = 32
NEGATIVE_CACHE_S = 60.0  # a version the registry does not have: ask again after this
UNREACHABLE_RETRY_S = 30.0  # registry down: do not wait on it again before this
LOOKUP_TIMEOUT_S = 3.0

# (model, version) -> True (registered), False (not registered), None (cannot tell).
Lookup = Callable[[str, str], bool | None]


class StreamGate:
    """Decides, per batch, which new streams are refused and why."""

    def __init__(self, max_streams: int = DEFAULT_MAX_STREAMS, lookup: Lookup | None = None):
        self.max_streams = max_streams
        self.lookup = lookup
        self._absent: dict[StreamKey, float] = {}  # not registered, until
        self._unreachable_until = 0.0
        self._lock = threading.Lock()

    def refusals(self, new: Sequence[StreamKey], known: int) -> dict[StreamKey, str]:
        """Reasons for the new streams that may not be opened (the others may).

        Raises IngestRefused when the batch opens too many streams at once.
        """
        if len(new) > MAX_NEW_STREAMS_PER_BATCH:
            raise IngestRefused(
                422,
                f"the batch opens {len(new)} new model versions; at most "
                f"{MAX_NEW_STREAMS_PER_BATCH} per batch (send smaller batches)",
            )
        refused: dict[StreamKey, str] = {}
        room = self.max_streams - known
        for key in new:
            registered = self._registered(key)
            if registered is False:
                refused[key] = f"model version {key[0]}/{key[1]} is not in the registry"
            elif room <= 0:
                refused[key] = (
                    f"the monitor already tracks {self.max_streams} model versions "
                    "(FLOWLINE_MONITOR_MAX_STREAMS)"
                )
            else:
                room -= 1
        return refused

    def _registered(self, key: StreamKey) -> bool | None:
        if self.lookup is None:
            return None
        now = time.monotonic()
        with self._lock:
            if self._absent.get(key, 0.0) > now:
                return False
            if self._unreachable_until > now:
                return None
        answer = self.lookup(*key)
        with self._lock:
            if answer is None:
                if self._unreachable_until <= now:
                    logger.warning(
                        "monitor: cannot ask the registry about %s/%s; new model versions "
                        "are taken on unchecked for %.0fs",
                        key[0],
                        key[1],
                        UNREACHABLE_RETRY_S,
                    )
                self._unreachable_until = now + UNREACHABLE_RETRY_S
            elif answer is False:
                if len(self._absent) > 10_000:
                    self._absent.clear()
                self._absent[key] = now + NEGATIVE_CACHE_S
        return answer


def registry_lookup(tracking_uri: str) -> Lookup | None:
    """A lookup of model versions in the registry at ``tracking_uri`` (None when unset)."""
    if not tracking_uri:
        return None
    if tracking_uri.startswith(("http://", "https://")):
        return _rest_lookup(tracking_uri)

    def local(model: str, version: str) -> bool | None:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            MlflowClient(tracking_uri).get_model_version(model, version)
        except MlflowException as exc:
            return _verdict(exc.error_code)
        except Exception:  # a broken store: cannot tell
            return None
        return True

    return local


def _rest_lookup(tracking_uri: str) -> Lookup:
    def lookup(model: str, version: str) -> bool | None:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        # One short try, no retries: ingest waits on it, and an outage is cached above.
        try:
            answer = http_request(
                get_default_host_creds(tracking_uri),
                "/api/2.0/mlflow/model-versions/get",
                "GET",
                max_retries=0,
                timeout=LOOKUP_TIMEOUT_S,
                params={"name": model, "version": version},
            )
        except Exception:
            return None
        if answer.status_code == 200:
            return True
        try:
            code = answer.json().get("error_code")
        except ValueError:
            return None
        return _verdict(code)

    return lookup


def _verdict(error_code: str | None) -> bool | None:
    # INVALID_PARAMETER_VALUE: a version that is not a number cannot be registered.
    if error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        return False
    return None
