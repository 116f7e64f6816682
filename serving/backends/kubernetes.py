"""The Kubernetes backend: each replica is one Deployment behind its own Service.

**How the protocol maps onto objects.** One `start_replica` call creates one Deployment
(the version's image, one pod, or the HPA's minimum), one ClusterIP Service selecting
exactly that Deployment's pods, and, when the model's ``flowline.kubernetes`` tag asks,
an HPA and a PDB (serving/backends/k8s_objects.py). `Replica.url` is the Service's
cluster DNS name. One Deployment per *version*, scaled by calls, was the alternative,
and it breaks the reconciler's contract: it counts, routes, smoke-tests, drains and
stops replicas one URL at a time, so every replica of a version behind one shared
Service URL would be one route entry, and scaling down would drain and stop a URL the
remaining replicas still serve. With one Service per replica, the protocol keeps its
exact meaning; an HPA scales the pods behind one replica's Service, so a model that
autoscales is best left at ``flowline.replicas`` 1, with the HPA's bounds in its tag.

**Blue/green stays the reconciler's.** `start_replica` returns once the new Deployment
is ready (observed generation, ready and available pods; k8s_readiness.py), or raises
BackendError with one line (the deadline and what it waited for, an image pull error, a
crash loop with the container's last log line) after removing what it created. The
reconciler then smoke-tests through the Service, switches the gateway's route, drains
the old URLs and calls `stop_replica`, which deletes the HPA (it would scale back up),
scales the Deployment to zero, and deletes the Service, the PDB and the Deployment;
a 404 is success, so it is idempotent. Pods stop with a ``preStop`` sleep so endpoints
are withdrawn before SIGTERM.

**Ownership.** Every object carries ``app.kubernetes.io/managed-by=flowline`` and the
controller's ``app.kubernetes.io/instance`` (FLOWLINE_K8S_INSTANCE, else a digest of
the flowline home): `adopt_running` lists by them after a restart, and `stop_all`
removes only them. The Service, HPA and PDB are owned by their Deployment, so the
cluster's garbage collector removes them with it even if a controller dies mid-stop;
`adopt_running` also sweeps any left without a Deployment.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from common.registry import RESOURCES_MODEL_TAG
from serving.backends.base import BackendError, Replica
from serving.backends.docker import ReplicaResourceSettings, Resources
from serving.backends.k8s_client import KubeApis, KubernetesSettings, instance_of, load_apis
from serving.backends.k8s_images import ImageSource, RegistryPublisher
from serving.backends.k8s_objects import (
    KUBERNETES_MODEL_TAG,
    MODEL,
    VERSION,
    KubernetesOptions,
    ReplicaSpec,
    autoscaler,
    deployment,
    disruption_budget,
    label_selector,
    new_replica_id,
    owner_reference,
    ownership_labels,
    selector_labels,
    service,
    service_url,
)
from serving.backends.k8s_readiness import rollout_state

log = logging.getLogger(__name__)

# What a call to the API server may fail with: an answer that is an error, or no answer.
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
NAME_ATTEMPTS = 3


def api_reason(exc: BaseException) -> str:
    """One line saying why an API call failed: the server's own message when it gave one."""
    if isinstance(exc, ApiException):
        message = exc.reason or ""
        try:
            message = json.loads(exc.body or "{}").get("message") or message
        except (ValueError, AttributeError):
            pass
        return f"the Kubernetes API answered {exc.status}: {' '.join(str(message).split())[:300]}"
    return f"the Kubernetes API did not answer ({type(exc).__name__})"


def _missing(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


class KubernetesBackend:
    """Runs each replica as a Deployment and a Service in one namespace of a cluster."""

    def __init__(
        self,
        tracking_uri: str,
        home: Path,
        settings: KubernetesSettings | None = None,
        apis: KubeApis | None = None,
        namespace: str | None = None,
        images: ImageSource | None = None,
        tags_of: Callable[[str], Mapping[str, str]] | None = None,
        poll_interval: float = 1.0,
    ) -> None:
        """Connect (lazily: nothing is called yet) with ``settings`` (default: the
        environment); ``apis``, ``images`` and ``tags_of`` replace the real cluster,
        registry push and MLflow registry in tests."""
        self.tracking_uri = tracking_uri
        self.home = home
        self.settings = settings or KubernetesSettings.from_env()
        if apis is None:
            apis, found = load_apis(self.settings)
        else:
            found = self.settings.k8s_namespace or "default"
        self.apis = apis
        self.namespace = namespace or found
        self.instance = instance_of(self.settings, home)
        self.images = images or RegistryPublisher(tracking_uri, home, self.settings.k8s_registry)
        self._tags_of = tags_of or self._registry_tags
        self.poll_interval = poll_interval
        self.timeout = self.settings.k8s_request_timeout_s
        defaults = ReplicaResourceSettings.from_env()
        self.default_cpus = defaults.replica_cpus
        self.default_memory = defaults.replica_memory
        self._selector = label_selector(ownership_labels(self.instance))

    # -- what a replica is -----------------------------------------------------------

    def _registry_tags(self, model: str) -> Mapping[str, str]:
        try:
            return (
                MlflowClient(self.tracking_uri, self.tracking_uri).get_registered_model(model).tags
            )
        except MlflowException as exc:
            raise BackendError(f"could not read {model}'s tags: {exc.message}") from None

    def spec_for(self, model: str, version: str, model_uri: str) -> ReplicaSpec:
        """The replica to create: tags read and checked first, the image built and
        pushed last, so a bad tag costs no build."""
        tags = self._tags_of(model)
        resources = Resources.parse(
            tags.get(RESOURCES_MODEL_TAG), self.default_cpus, self.default_memory
        )
        options = KubernetesOptions.parse(tags.get(KUBERNETES_MODEL_TAG))
        image = self.images.reference(model, version, model_uri)
        return ReplicaSpec(
            model=model,
            version=version,
            replica_id=new_replica_id(),
            image=image,
            resources=resources,
            instance=self.instance,
            home=str(self.home),
            options=options,
            service_port=self.settings.k8s_service_port,
            workers=self.settings.k8s_workers,
            drain_seconds=self.settings.k8s_drain_s,
            startup_seconds=self.settings.k8s_ready_timeout_s,
            image_pull_secret=self.settings.k8s_image_pull_secret,
        )

    # -- replicas --------------------------------------------------------------------

    def start_replica(self, model: str, version: str, model_uri: str) -> Replica:
        """Create the replica's objects and return once its Deployment is ready; on any
        failure nothing of it is left and BackendError says why in one line."""
        spec = self.spec_for(model, version, model_uri)
        what = f"replica of {model}/{version}"
        try:
            spec, created = self._create_deployment(spec)
        except API_ERRORS as exc:
            raise BackendError(f"{what}: {api_reason(exc)}") from None
        try:
            owner = owner_reference(created)
            self.apis.core.create_namespaced_service(
                self.namespace, service(spec, owner), _request_timeout=self.timeout
            )
            hpa = autoscaler(spec, owner)
            if hpa is not None:
                self.apis.autoscaling.create_namespaced_horizontal_pod_autoscaler(
                    self.namespace, hpa, _request_timeout=self.timeout
                )
            pdb = disruption_budget(spec, owner)
            if pdb is not None:
                self.apis.policy.create_namespaced_pod_disruption_budget(
                    self.namespace, pdb, _request_timeout=self.timeout
                )
            self._wait_ready(spec, what)
        except BackendError:
            self._remove(spec.name)
            raise
        except API_ERRORS as exc:
            self._remove(spec.name)
            raise BackendError(f"{what}: {api_reason(exc)}") from None
        url = service_url(spec.name, self.namespace, spec.service_port)
        log.info("%s ready at %s (image %s)", what, url, spec.image)
        return Replica(model, version, url, spec.name)

    def _create_deployment(self, spec: ReplicaSpec) -> tuple[ReplicaSpec, Any]:
        """Create the Deployment under a fresh name; another id when the name is taken
        (never the other one's objects removed: nothing is created under a taken name)."""
        for attempt in range(NAME_ATTEMPTS):
            try:
                created = self.apis.apps.create_namespaced_deployment(
                    self.namespace, deployment(spec), _request_timeout=self.timeout
                )
                return spec, created
            except ApiException as exc:
                if exc.status != 409 or attempt == NAME_ATTEMPTS - 1:
                    raise
                spec = replace(spec, replica_id=new_replica_id())
        raise AssertionError("unreachable")

    def _pods(self, spec: ReplicaSpec) -> list[Any]:
        selector = label_selector(selector_labels(spec.instance, spec.replica_id))
        return self.apis.core.list_namespaced_pod(
            self.namespace, label_selector=selector, _request_timeout=self.timeout
        ).items

    def _wait_ready(self, spec: ReplicaSpec, what: str) -> None:
        """Poll the Deployment and its pods until ready, failed, or past the deadline."""
        timeout = self.settings.k8s_ready_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                current = self.apis.apps.read_namespaced_deployment(
                    spec.name, self.namespace, _request_timeout=self.timeout
                )
            except ApiException as exc:
                if exc.status == 404:
                    raise BackendError(f"{what}: its Deployment was deleted") from None
                raise
            pods = self._pods(spec)
            state = rollout_state(current, pods)
            if state.ready:
                return
            if state.failure is not None:
                raise BackendError(f"{what} failed: {state.failure}{self._crash_log(pods)}")
            if time.monotonic() >= deadline:
                raise BackendError(f"{what} was not ready within {timeout:g} s: {state.waiting}")
            time.sleep(self.poll_interval)

    def _crash_log(self, pods: list[Any]) -> str:
        """': <the last line>' a crashed scorer wrote, or '' (logs are a courtesy)."""
        for pod in pods:
            for status in (pod.status.container_statuses or []) if pod.status else []:
                if not status.restart_count:
                    continue
                try:
                    text = self.apis.core.read_namespaced_pod_log(
                        pod.metadata.name,
                        self.namespace,
                        container=status.name,
                        previous=True,
                        tail_lines=40,
                        _request_timeout=self.timeout,
                    )
                except API_ERRORS:
                    return ""
                lines = [line.strip() for line in str(text).splitlines() if line.strip()]
                return f": {lines[-1][:300]}" if lines else ""
        return ""

    def is_alive(self, replica: Replica) -> bool:
        """True while the replica's Deployment exists and has a ready pod.

        An API server that does not answer says nothing about the pods, which keep
        serving without it: such a replica counts as alive, or every API outage would
        replace every replica.
        """
        try:
            current = self.apis.apps.read_namespaced_deployment(
                _name_of(replica), self.namespace, _request_timeout=self.timeout
            )
        except API_ERRORS as exc:
            if _missing(exc):
                return False
            log.warning("could not check %s: %s", replica.url, api_reason(exc))
            return True
        if current.metadata.deletion_timestamp is not None:
            return False
        return ((current.status and current.status.ready_replicas) or 0) >= 1

    def stop_replica(self, replica: Replica) -> None:
        """Scale the replica to zero and delete its objects; idempotent."""
        self._remove(_name_of(replica))

    def _remove(self, name: str) -> None:
        """Delete one replica's objects, each step on its own: a 404 is done already,
        any other failure is logged and left to `adopt_running`'s sweep."""
        ns, timeout = self.namespace, self.timeout
        apps, core = self.apis.apps, self.apis.core
        steps: list[tuple[str, Callable[[], Any]]] = [
            # The HPA first: it would scale the Deployment back up from zero.
            (
                "HorizontalPodAutoscaler",
                lambda: self.apis.autoscaling.delete_namespaced_horizontal_pod_autoscaler(
                    name, ns, _request_timeout=timeout
                ),
            ),
            (
                "Deployment scale",
                lambda: apps.patch_namespaced_deployment(
                    name, ns, {"spec": {"replicas": 0}}, _request_timeout=timeout
                ),
            ),
            ("Service", lambda: core.delete_namespaced_service(name, ns, _request_timeout=timeout)),
            (
                "PodDisruptionBudget",
                lambda: self.apis.policy.delete_namespaced_pod_disruption_budget(
                    name, ns, _request_timeout=timeout
                ),
            ),
            (
                "Deployment",
                lambda: apps.delete_namespaced_deployment(
                    name, ns, propagation_policy="Background", _request_timeout=timeout
                ),
            ),
        ]
        for kind, call in steps:
            try:
                call()
            except API_ERRORS as exc:
                if not _missing(exc):
                    log.warning("could not remove %s %s/%s: %s", kind, ns, name, api_reason(exc))

    # -- this instance's objects -----------------------------------------------------

    def adopt_running(self) -> list[Replica]:
        """Ready replicas of this instance, found by label and taken over as they run.

        A labelled Deployment that is not ready (or has no Service) is removed, as is any
        Service, HPA or PDB whose Deployment is gone. BackendError when the API cannot be
        listed: the router then adopts from the other backends.
        """
        try:
            found = self.apis.apps.list_namespaced_deployment(
                self.namespace, label_selector=self._selector, _request_timeout=self.timeout
            ).items
            adopted: list[Replica] = []
            for current in found:
                replica = self._adoptable(current)
                if replica is None:
                    self._remove(current.metadata.name)
                else:
                    adopted.append(replica)
            self._sweep(keep={(r.handle or "") for r in adopted})
        except API_ERRORS as exc:
            raise BackendError(
                f"could not list replicas in namespace {self.namespace}: {api_reason(exc)}"
            ) from None
        return adopted

    def _adoptable(self, current: Any) -> Replica | None:
        meta = current.metadata
        notes = meta.annotations or {}
        model, version = notes.get(MODEL), notes.get(VERSION)
        if meta.deletion_timestamp is not None or model is None or version is None:
            return None
        if not rollout_state(current, []).ready:
            return None
        try:
            svc = self.apis.core.read_namespaced_service(
                meta.name, self.namespace, _request_timeout=self.timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        # The Service's own port: the setting may have changed since it was created.
        port = svc.spec.ports[0].port
        return Replica(model, version, service_url(meta.name, self.namespace, port), meta.name)

    def _owned(self) -> list[tuple[str, Any, Callable[[str], Any]]]:
        """(kind, list call, delete call) of each kind of object a replica may have
        besides its Deployment."""
        ns, timeout, sel = self.namespace, self.timeout, self._selector
        core, hpa, pdb = self.apis.core, self.apis.autoscaling, self.apis.policy
        return [
            (
                "Service",
                lambda: core.list_namespaced_service(ns, label_selector=sel),
                lambda n: core.delete_namespaced_service(n, ns, _request_timeout=timeout),
            ),
            (
                "HorizontalPodAutoscaler",
                lambda: hpa.list_namespaced_horizontal_pod_autoscaler(ns, label_selector=sel),
                lambda n: hpa.delete_namespaced_horizontal_pod_autoscaler(
                    n, ns, _request_timeout=timeout
                ),
            ),
            (
                "PodDisruptionBudget",
                lambda: pdb.list_namespaced_pod_disruption_budget(ns, label_selector=sel),
                lambda n: pdb.delete_namespaced_pod_disruption_budget(
                    n, ns, _request_timeout=timeout
                ),
            ),
        ]

    def _sweep(self, keep: set[str]) -> None:
        """Delete this instance's Services, HPAs and PDBs not named in ``keep``."""
        for kind, list_call, delete in self._owned():
            for item in list_call().items:
                name = item.metadata.name
                if name in keep:
                    continue
                try:
                    delete(name)
                except API_ERRORS as exc:
                    if not _missing(exc):
                        log.warning("could not remove %s %s: %s", kind, name, api_reason(exc))

    def stop_all(self) -> None:
        """Remove every object of this instance, replicas it did not start included;
        other instances' and other tools' objects are never touched."""
        try:
            found = self.apis.apps.list_namespaced_deployment(
                self.namespace, label_selector=self._selector, _request_timeout=self.timeout
            ).items
            for current in found:
                self._remove(current.metadata.name)
            self._sweep(keep=set())
        except API_ERRORS as exc:
            log.warning("could not stop the replicas in %s: %s", self.namespace, api_reason(exc))


def _name_of(replica: Replica) -> str:
    """The name of a replica's objects: its handle, else the first label of its URL's
    host (the Service name), so a replica rebuilt from a URL alone can still be stopped."""
    if isinstance(replica.handle, str) and replica.handle:
        return replica.handle
    return replica.url.split("//", 1)[-1].split(".", 1)[0].split(":", 1)[0]
