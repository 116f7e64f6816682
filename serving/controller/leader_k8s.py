"""Leader election on Kubernetes: a ``coordination.k8s.io/v1`` Lease, as client-go does it.

The holder renews ``renewTime`` every round; a candidate takes the Lease once
``renewTime + leaseDurationSeconds`` has passed. Every write is a ``replace`` carrying
the ``resourceVersion`` that was read, so of two candidates racing for an expired Lease
the API server accepts one and answers the other 409.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from typing import Any

from serving.controller.leader import LEADER_LEASE

log = logging.getLogger("flowline.controller")
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class KubernetesLeaseElector:
    """Holds the Lease ``name`` in ``namespace`` through a CoordinationV1Api."""

    def __init__(
        self,
        api: Any,
        namespace: str,
        identity: str,
        ttl_s: float,
        name: str = LEADER_LEASE,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.identity = identity
        self.ttl_s = max(1, math.ceil(ttl_s))
        self.name = name

    @classmethod
    def in_cluster(cls, identity: str, ttl_s: float) -> KubernetesLeaseElector:
        """The elector of a controller pod: its ServiceAccount, its namespace."""
        from kubernetes import client, config

        config.load_incluster_config()
        namespace = os.environ.get("FLOWLINE_K8S_NAMESPACE") or _pod_namespace()
        return cls(client.CoordinationV1Api(), namespace, identity, ttl_s)

    def try_lead(self) -> bool:
        """Create, renew or take over the Lease; False when another holds it, or on 409."""
        from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta
        from kubernetes.client.exceptions import ApiException

        now = _now()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot read the leader Lease: %s", exc.reason)
                return False
            body = V1Lease(
                metadata=V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=self._spec(V1LeaseSpec, now, now, transitions=0),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException:
                return False  # another candidate created it first
        spec = lease.spec
        mine = spec.holder_identity == self.identity
        if not mine and not self._expired(spec, now):
            return False
        acquired = spec.acquire_time if mine else now
        transitions = (spec.lease_transitions or 0) + (0 if mine else 1)
        lease.spec = self._spec(V1LeaseSpec, acquired, now, transitions)
        try:
            # resourceVersion stays as read: a concurrent writer makes this a 409.
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except ApiException as exc:
            if exc.status != 409:
                log.warning("cannot renew the leader Lease: %s", exc.reason)
            return False

    def _spec(
        self, spec_class: Any, acquired: dt.datetime, renewed: dt.datetime, transitions: int
    ) -> Any:
        return spec_class(
            holder_identity=self.identity,
            lease_duration_seconds=self.ttl_s,
            acquire_time=acquired,
            renew_time=renewed,
            lease_transitions=transitions,
        )

    @staticmethod
    def _expired(spec: Any, now: dt.datetime) -> bool:
        if not spec.holder_identity or spec.renew_time is None:
            return True
        duration = dt.timedelta(seconds=spec.lease_duration_seconds or 0)
        return spec.renew_time + duration < now

    def resign(self) -> None:
        """Clear the holder so a candidate takes over at its next round."""
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException:
            pass  # it expires by itself


def _pod_namespace() -> str:
    try:
        with open(NAMESPACE_FILE) as handle:
            return handle.read().strip()
    except OSError:
        return "default"
