"""Baselines of model versions, fetched from the MLflow registry once per version and cached."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.registry import BASELINE_TAG
from monitoring.drift.evaluate import DriftConfig, PreparedBaseline, prepare_baseline
from monitoring.profile.baseline import FILE_NAME, ProfileError, loads

logger = logging.getLogger(__name__)

DEFAULT_PATH = f"artifacts/{FILE_NAME}"
MISSING_RETRY_S = 60.0  # a version without a baseline: ask again this often
ERROR_RETRY_S = 5.0  # registry unreachable: ask again this often


class BaselineUnavailable(RuntimeError):
    """No baseline for this version right now; ``retry_at`` says when to ask again."""

    def __init__(self, message: str, retry_at: float, permanent: bool) -> None:
        super().__init__(message)
        self.retry_at = retry_at
        self.permanent = permanent


def fetch_from_registry(model: str, version: str, tracking_uri: str = "") -> dict[str, Any]:
    """Download and validate ``models:/{model}/{version}/<flowline.baseline tag>``.

    Raises ProfileError when the version exists but has no readable baseline,
    and MlflowException/OSError when the registry cannot be reached.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri or None)
    try:
        tags = client.get_model_version(model, version).tags or {}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ProfileError(f"model version {model}/{version} is not registered") from None
        raise
    path = tags.get(BASELINE_TAG) or DEFAULT_PATH
    with tempfile.TemporaryDirectory(prefix="flowline-baseline-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model}/{version}/{path}",
                dst_path=tmp,
                tracking_uri=tracking_uri or None,
            )
        except MlflowException as exc:
            missing = exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
            # The artifact proxy wraps a missing file's 404 in a generic download failure.
            if missing or "RESOURCE_DOES_NOT_EXIST" in str(exc):
                raise ProfileError(f"{model}/{version} has no {path}") from None
            raise
        except FileNotFoundError:
            raise ProfileError(f"{model}/{version} has no {path}") from None
        return loads(Path(local).read_bytes())


Fetcher = Callable[[str, str], dict[str, Any]]


class BaselineCache:
    """Prepared baselines per (model, version): fetched once, failures retried later."""

    def __init__(self, fetch: Fetcher, config: DriftConfig | None = None) -> None:
        self._fetch = fetch
        self._config = config or DriftConfig()
        self._ready: dict[tuple[str, str], PreparedBaseline] = {}
        self._failed: dict[tuple[str, str], BaselineUnavailable] = {}
        self._lock = threading.Lock()

    def get(self, model: str, version: str, now: float | None = None) -> PreparedBaseline:
        """The prepared baseline, or BaselineUnavailable (with when to retry)."""
        key = (model, version)
        now = time.time() if now is None else now
        with self._lock:
            if key in self._ready:
                return self._ready[key]
            failure = self._failed.get(key)
            if failure is not None and now < failure.retry_at:
                raise failure
        try:
            profile = self._fetch(model, version)
            prepared = prepare_baseline(profile, self._config)
        except (ProfileError, KeyError, TypeError, ValueError) as exc:
            failure = BaselineUnavailable(str(exc), now + MISSING_RETRY_S, permanent=True)
            logger.warning("no usable baseline for %s/%s: %s", model, version, exc)
        except Exception as exc:  # registry down, network errors: try again soon
            failure = BaselineUnavailable(
                f"{type(exc).__name__}: {exc}", now + ERROR_RETRY_S, permanent=False
            )
            logger.warning("baseline of %s/%s not fetched yet: %s", model, version, failure)
        else:
            with self._lock:
                self._ready[key] = prepared
                self._failed.pop(key, None)
            return prepared
        with self._lock:
            self._failed[key] = failure
        raise failure

    def missing(self) -> dict[tuple[str, str], str]:
        """Versions whose baseline could not be had, with the reason."""
        with self._lock:
            return {k: str(v) for k, v in self._failed.items()}
