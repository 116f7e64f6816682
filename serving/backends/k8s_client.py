"""The Kubernetes backend's settings and its API clients (``kubernetes``, the official one).

`KubernetesSettings` are FLOWLINE_K8S_* variables; `load_apis` makes one `ApiClient`
from the pod's service account (in-cluster) or a kubeconfig and returns the typed APIs
the backend (and leader election) call, bundled in `KubeApis` so that a test injects
its fakes (tests/k8s_fake.py) in one argument. Loading never contacts the cluster: a
missing or broken configuration is one BackendError line at once, and a cluster that
does not answer fails the first call after ``FLOWLINE_K8S_REQUEST_TIMEOUT_S``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException
from pydantic import field_validator

from common.settings import (
    FlowlineBaseSettings,
    OptionalStr,
    Port,
    PositiveFloat,
    PositiveInt,
)
from serving.backends.base import BackendError

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubernetesSettings(FlowlineBaseSettings):
    """FLOWLINE_K8S_*: where the Kubernetes backend runs replicas and how it connects.

    ``k8s_namespace`` empty: the controller pod's own namespace in-cluster, else the
    kubeconfig context's, else ``default``. ``k8s_registry`` empty: images are not
    pushed (loaded into the cluster by hand). ``k8s_instance`` empty: derived from the
    flowline home, so a restarted controller with the same home finds its replicas.
    """

    k8s_namespace: str = ""
    k8s_registry: str = ""
    k8s_service_port: Port = 8080
    k8s_ready_timeout_s: PositiveFloat = 300.0
    k8s_config: Literal["auto", "in-cluster", "kubeconfig"] = "auto"
    k8s_kubeconfig: OptionalStr = None
    k8s_context: OptionalStr = None
    k8s_instance: OptionalStr = None
    k8s_drain_s: PositiveInt = 10
    k8s_workers: PositiveInt = 1
    k8s_image_pull_secret: OptionalStr = None
    k8s_request_timeout_s: PositiveFloat = 30.0

    @field_validator("k8s_service_port")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be a port number (1-65535)")
        return value

    @field_validator("k8s_instance")
    @classmethod
    def _label_value(cls, value: str | None) -> str | None:
        if value is not None and not _LABEL_VALUE.match(value):
            raise ValueError("must be a label value: up to 63 of A-Z a-z 0-9 . _ -")
        return value


@dataclass(frozen=True)
class KubeApis:
    """The typed Kubernetes APIs flowline calls, sharing one connection pool."""

    apps: Any  # client.AppsV1Api
    core: Any  # client.CoreV1Api
    autoscaling: Any  # client.AutoscalingV2Api
    policy: Any  # client.PolicyV1Api
    coordination: Any  # client.CoordinationV1Api

    @classmethod
    def of(cls, api_client: client.ApiClient) -> KubeApis:
        """The APIs of one configured ``ApiClient``."""
        return cls(
            client.AppsV1Api(api_client),
            client.CoreV1Api(api_client),
            client.AutoscalingV2Api(api_client),
            client.PolicyV1Api(api_client),
            client.CoordinationV1Api(api_client),
        )


def _mode(settings: KubernetesSettings) -> str:
    if settings.k8s_config != "auto":
        return settings.k8s_config
    # Set by the kubelet in every pod: the controller runs in the cluster it manages.
    return "in-cluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "kubeconfig"


def load_apis(settings: KubernetesSettings) -> tuple[KubeApis, str]:
    """The APIs and the namespace to use; BackendError when no configuration loads."""
    mode = _mode(settings)
    configuration = client.Configuration()
    try:
        if mode == "in-cluster":
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=settings.k8s_kubeconfig,
                context=settings.k8s_context,
                client_configuration=configuration,
                persist_config=False,
            )
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"no Kubernetes configuration ({mode}): {first}") from None
    # One retry, not urllib3's three: an unreachable API server must fail a call within
    # the request timeout, not hold a reconcile pass four times as long.
    configuration.retries = 1
    return KubeApis.of(client.ApiClient(configuration)), namespace_of(settings, mode)


def namespace_of(settings: KubernetesSettings, mode: str) -> str:
    """The namespace replicas go to (see `KubernetesSettings`)."""
    if settings.k8s_namespace:
        return settings.k8s_namespace
    if mode == "in-cluster" and SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    try:
        _, active = config.list_kube_config_contexts(config_file=settings.k8s_kubeconfig)
    except (ConfigException, OSError, TypeError, ValueError):
        return "default"
    context = (active or {}).get("context") or {}
    return str(context.get("namespace") or "default")


def instance_of(settings: KubernetesSettings, home: Path) -> str:
    """The instance label value: the setting, else a digest of the flowline home (a
    path is no valid label value, and two homes must not adopt each other's replicas)."""
    if settings.k8s_instance:
        return settings.k8s_instance
    return "home-" + hashlib.sha256(str(home).encode()).hexdigest()[:12]
