"""Per-model backends: each registered model's replicas run where its tag says.

The platform has a default backend (``flowline up --backend``); a registered model's
``flowline.backend`` tag (``local`` or ``docker``, set in the UI or by ``mlflow
deployments create --config backend=docker``) overrides it for that model. The router
is itself a `Backend`, so the controller does not know there are several.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from mlflow.exceptions import MlflowException

from common.registry import BACKEND_MODEL_TAG
from serving.backends.base import Backend, BackendError, Replica
from serving.backends.factory import BACKENDS

log = logging.getLogger(__name__)


class BackendRouter:
    """Starts each replica on its model's backend and remembers which one owns it."""

    def __init__(
        self,
        default: str,
        make: Callable[[str], Backend],
        tag_of: Callable[[str], str | None],
    ) -> None:
        self.default = default
        self._make = make
        self._tag_of = tag_of
        self._backends: dict[str, Backend] = {}
        self._owner: dict[str, str] = {}
        self._lock = threading.Lock()
        self.backend(default)  # the default must work now: a missing daemon stops the start

    def backend(self, kind: str) -> Backend:
        """The backend named ``kind``, created on first use."""
        with self._lock:
            if kind not in self._backends:
                self._backends[kind] = self._make(kind)
            return self._backends[kind]

    def kind_for(self, model: str) -> str:
        """The backend ``model`` runs on: its tag, else the platform's default."""
        try:
            kind = (self._tag_of(model) or self.default).strip()
        except MlflowException as exc:  # the registry is down: a failed start, retried later
            raise BackendError(f"could not read {model}'s tags: {exc.message}") from None
        if kind not in BACKENDS:
            raise BackendError(
                f"tag {BACKEND_MODEL_TAG}={kind!r} is invalid: choose one of {', '.join(BACKENDS)}"
            )
        return kind

    def start_replica(self, model: str, version: str, model_uri: str) -> Replica:
        """Start one replica on the model's backend."""
        kind = self.kind_for(model)
        replica = self.backend(kind).start_replica(model, version, model_uri)
        with self._lock:
            self._owner[replica.url] = kind
        return replica

    def _of(self, replica: Replica) -> Backend:
        with self._lock:
            kind = self._owner.get(replica.url, self.default)
        return self.backend(kind)

    def is_alive(self, replica: Replica) -> bool:
        """Asked of the backend that started the replica."""
        return self._of(replica).is_alive(replica)

    def stop_replica(self, replica: Replica) -> None:
        """Stopped by the backend that started the replica."""
        self._of(replica).stop_replica(replica)
        with self._lock:
            self._owner.pop(replica.url, None)

    def stop_all(self) -> None:
        """Every backend in use stops all of its replicas."""
        with self._lock:
            backends = list(self._backends.values())
        for backend in backends:
            backend.stop_all()

    def adopt_running(self) -> list[Replica]:
        """Replicas left running on any backend; one whose runtime is gone is skipped."""
        adopted: list[Replica] = []
        for kind in BACKENDS:
            if kind == "kubernetes" and not self._may_use_kubernetes():
                continue
            try:
                found = self.backend(kind).adopt_running()
            except BackendError as exc:
                log.info("no %s replicas to adopt: %s", kind, exc)
                continue
            with self._lock:
                self._owner.update({r.url: kind for r in found})
            adopted.extend(found)
        return adopted

    def _may_use_kubernetes(self) -> bool:
        # Only a controller that runs Kubernetes replicas (its default, or one set up for
        # a cluster) asks a cluster: a kubeconfig on a laptop must not slow every start.
        return self.default == "kubernetes" or any(
            name in os.environ for name in ("KUBERNETES_SERVICE_HOST", "FLOWLINE_K8S_NAMESPACE")
        )
