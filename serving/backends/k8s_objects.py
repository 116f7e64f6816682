"""The Kubernetes objects of one scoring replica, built as typed client models.

Pure: nothing here talks to a cluster. `replica_objects` turns a `ReplicaSpec` (which
model version, which image, which limits, which autoscaling) into the objects
`serving/backends/kubernetes.py` creates, in order: a ``Deployment``, a ``Service``, and
optionally an autoscaling/v2 ``HorizontalPodAutoscaler`` and a policy/v1
``PodDisruptionBudget``. Their invariants:

* every object carries the same labels (`replica_labels`): managed-by flowline, the
  controller's instance, component and ``flowline.role=replica`` (the label the
  NetworkPolicies of ``flowline k8s render`` open to the gateway and the controller),
  the model, the version and the replica id; the exact model and version names, which
  need not be valid label values, are annotations;
* the Deployment and the Service select pods by instance and replica id only: two
  replicas of one version never share a Service;
* pods run the version's image as nobody with a restricted securityContext, a read-only
  root filesystem and an ``emptyDir`` at /tmp (``HOME=/tmp`` in the image), and hold the
  port the NetworkPolicy opens (`CONTAINER_PORT`).

The per-model ``flowline.kubernetes`` tag (`KubernetesOptions`) asks for the optional
objects: ``{"hpa": {"min": 1, "max": 5, "cpu": 70}}`` (or ``"rps": 20`` with an optional
``"metric"`` name, a Pods metric served by a Prometheus adapter) and ``{"pdb":
{"minAvailable": 1}}`` or ``{"pdb": {"maxUnavailable": 1}}``.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from serving.backends.base import BackendError
from serving.backends.docker import Resources
from serving.images.builder import REPLICA_USER

KUBERNETES_MODEL_TAG = "flowline.kubernetes"
MANAGED_BY = "app.kubernetes.io/managed-by"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
# Must match flowline/k8s.py's ROLE_LABEL: its NetworkPolicy opens replicas by this label.
ROLE = "flowline.role"
MODEL = "flowline.io/model"
VERSION = "flowline.io/version"
REPLICA = "flowline.io/replica"
HOME_ANNOTATION = "flowline.io/home"
# The port the replica NetworkPolicy of `flowline k8s render` opens; the Service's own
# port is configurable, this one is not.
CONTAINER_PORT = 8080
DEFAULT_RPS_METRIC = "flowline_requests_per_second"
MAX_REPLICAS = 100
_UID, _GID = (int(part) for part in REPLICA_USER.split(":"))
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]+")
_DNS = re.compile(r"[^a-z0-9-]+")


def label_value(text: str) -> str:
    """``text`` as a valid label value: at most 63 of ``[A-Za-z0-9._-]``, alphanumeric at
    both ends (the exact text goes in an annotation)."""
    return _LABEL_VALUE.sub("-", text)[:63].strip("-._") or "x"


def _dns_part(text: str, size: int) -> str:
    return _DNS.sub("-", text.lower()).strip("-")[:size].strip("-") or "x"


def new_replica_id() -> str:
    """A fresh replica id: 8 hex digits, random so two controllers never pick the same."""
    return secrets.token_hex(4)


def object_name(model: str, version: str, replica_id: str) -> str:
    """The name of a replica's objects: an RFC 1035 label (a Service name) of at most
    63 characters, readable in ``kubectl get``, unique by the replica id."""
    version_part = _dns_part(version, 10)
    room = 63 - len("flowline--v-") - len(version_part) - len(replica_id)
    return f"flowline-{_dns_part(model, room)}-v{version_part}-{replica_id}"


def selector_labels(instance: str, replica_id: str) -> dict[str, str]:
    """The labels a replica's Deployment and Service select its pods by."""
    return {INSTANCE: instance, REPLICA: replica_id}


def ownership_labels(instance: str) -> dict[str, str]:
    """The labels every object of one controller instance carries: its list selector."""
    return {MANAGED_BY: "flowline", INSTANCE: instance, ROLE: "replica"}


def label_selector(labels: dict[str, str]) -> str:
    """``labels`` as an equality-based label selector string."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def replica_labels(instance: str, model: str, version: str, replica_id: str) -> dict[str, str]:
    """Every label of a replica's objects."""
    return {
        **ownership_labels(instance),
        COMPONENT: "replica",
        "app.kubernetes.io/name": "flowline-replica",
        MODEL: label_value(model),
        VERSION: label_value(version),
        REPLICA: replica_id,
    }


@dataclass(frozen=True)
class Autoscaling:
    """A HorizontalPodAutoscaler's bounds and target: CPU percent or requests/s per pod."""

    min_replicas: int
    max_replicas: int
    cpu_percent: int | None = None
    requests_per_second: float | None = None
    metric: str = DEFAULT_RPS_METRIC


@dataclass(frozen=True)
class DisruptionBudget:
    """A PodDisruptionBudget: exactly one of min_available / max_unavailable."""

    min_available: int | None = None
    max_unavailable: int | None = None


@dataclass(frozen=True)
class KubernetesOptions:
    """The ``flowline.kubernetes`` tag of a registered model; empty: no HPA, no PDB."""

    autoscaling: Autoscaling | None = None
    budget: DisruptionBudget | None = None

    @classmethod
    def parse(cls, tag: str | None) -> KubernetesOptions:
        """Read the tag; a bad one is a BackendError naming the tag, in one line."""
        try:
            spec = json.loads(tag) if tag else {}
            if not isinstance(spec, dict) or set(spec) - {"hpa", "pdb"}:
                raise ValueError("expected an object with the keys hpa and/or pdb")
            return cls(_autoscaling(spec.get("hpa")), _budget(spec.get("pdb")))
        except (TypeError, ValueError) as exc:
            raise BackendError(f"tag {KUBERNETES_MODEL_TAG}={tag!r} is invalid: {exc}") from None


def _count(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_REPLICAS:
        raise ValueError(f"{name} must be an integer from {low} to {MAX_REPLICAS}")
    return value


def _autoscaling(spec: Any) -> Autoscaling | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - {"min", "max", "cpu", "rps", "metric"}:
        raise ValueError("hpa takes the keys min, max and one of cpu or rps (and metric)")
    low = _count(spec.get("min", 1), "hpa.min", 1)
    high = _count(spec.get("max", max(low, 1)), "hpa.max", 1)
    if high < low:
        raise ValueError("hpa.max must be at least hpa.min")
    if ("cpu" in spec) == ("rps" in spec):
        raise ValueError("hpa needs exactly one target: cpu (percent) or rps")
    if "cpu" in spec:
        cpu = spec["cpu"]
        if isinstance(cpu, bool) or not isinstance(cpu, int) or not 1 <= cpu <= 1000:
            raise ValueError("hpa.cpu must be an integer percent from 1 to 1000")
        return Autoscaling(low, high, cpu_percent=cpu)
    rps = spec["rps"]
    if isinstance(rps, bool) or not isinstance(rps, int | float) or not rps > 0:
        raise ValueError("hpa.rps must be a positive number")
    metric = str(spec.get("metric", DEFAULT_RPS_METRIC))
    return Autoscaling(low, high, requests_per_second=float(rps), metric=metric)


def _budget(spec: Any) -> DisruptionBudget | None:
    if spec is None:
        return None
    if (
        not isinstance(spec, dict)
        or len(spec) != 1
        or not set(spec)
        <= {
            "minAvailable",
            "maxUnavailable",
        }
    ):
        raise ValueError("pdb takes exactly one of minAvailable or maxUnavailable")
    ((key, value),) = spec.items()
    count = _count(value, f"pdb.{key}", 0)
    if key == "minAvailable":
        return DisruptionBudget(min_available=count)
    return DisruptionBudget(max_unavailable=count)


def quantities(resources: Resources) -> dict[str, str]:
    """The ``flowline.resources`` limits as Kubernetes quantities (millicores, Mi)."""
    memory = resources.memory_bytes
    mib = 1024**2
    return {
        "cpu": f"{max(1, round(resources.cpus * 1000))}m",
        "memory": f"{memory // mib}Mi" if memory % mib == 0 else str(memory),
    }


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica is: its version, image, limits, options and the cluster's knobs."""

    model: str
    version: str
    replica_id: str
    image: str
    resources: Resources
    instance: str
    home: str
    options: KubernetesOptions = field(default_factory=KubernetesOptions)
    service_port: int = 8080
    workers: int = 1
    drain_seconds: int = 10
    startup_seconds: float = 300.0
    image_pull_secret: str | None = None

    @property
    def name(self) -> str:
        """The name every object of this replica shares."""
        return object_name(self.model, self.version, self.replica_id)

    @property
    def labels(self) -> dict[str, str]:
        """The labels every object of this replica carries."""
        return replica_labels(self.instance, self.model, self.version, self.replica_id)

    @property
    def initial_replicas(self) -> int:
        """Pods the Deployment starts with: the HPA's minimum, else one."""
        return self.options.autoscaling.min_replicas if self.options.autoscaling else 1


def _metadata(spec: ReplicaSpec, owner: client.V1OwnerReference | None) -> client.V1ObjectMeta:
    return client.V1ObjectMeta(
        name=spec.name,
        labels=spec.labels,
        annotations={MODEL: spec.model, VERSION: spec.version, HOME_ANNOTATION: spec.home},
        owner_references=[owner] if owner else None,
    )


def _security() -> client.V1SecurityContext:
    return client.V1SecurityContext(
        run_as_non_root=True,
        run_as_user=_UID,
        run_as_group=_GID,
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        capabilities=client.V1Capabilities(drop=["ALL"]),
        seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
    )


def _probe(path: str, period: int, failures: int) -> client.V1Probe:
    return client.V1Probe(
        http_get=client.V1HTTPGetAction(path=path, port="http"),
        period_seconds=period,
        timeout_seconds=3,
        failure_threshold=failures,
    )


def _container(spec: ReplicaSpec) -> client.V1Container:
    limits = quantities(spec.resources)
    # A model loads once at start and may take minutes: the startup probe holds the
    # liveness probe off until /ping answers, for as long as the controller waits.
    startup_failures = max(1, int(spec.startup_seconds // 5) + 1)
    return client.V1Container(
        name="scorer",
        image=spec.image,
        # Content-addressed tags (model digest in the tag) never change: pull once.
        image_pull_policy="IfNotPresent",
        # The image's entrypoint is `mlflow models serve -m /opt/flowline/model`.
        args=["-h", "0.0.0.0", "-p", str(CONTAINER_PORT), "-w", str(spec.workers)],
        ports=[client.V1ContainerPort(name="http", container_port=CONTAINER_PORT)],
        env=[client.V1EnvVar(name="PYTHONUNBUFFERED", value="1")],
        # Requests equal limits: the Guaranteed QoS class, so a replica is the last pod a
        # node evicts under memory pressure and its latency does not depend on neighbours.
        resources=client.V1ResourceRequirements(requests=limits, limits=limits),
        readiness_probe=_probe("/ping", 5, 3),
        liveness_probe=_probe("/health", 10, 6),
        startup_probe=_probe("/ping", 5, startup_failures),
        lifecycle=client.V1Lifecycle(
            # Endpoints are removed asynchronously after a pod is marked terminating:
            # sleeping first lets kube-proxy and the gateway's connections move away
            # before SIGTERM, so in-flight and just-routed requests still get answers.
            pre_stop=client.V1LifecycleHandler(
                _exec=client.V1ExecAction(command=["sleep", str(spec.drain_seconds)])
            )
        ),
        security_context=_security(),
        volume_mounts=[client.V1VolumeMount(name="tmp", mount_path="/tmp")],
    )


def deployment(spec: ReplicaSpec) -> client.V1Deployment:
    """The replica's Deployment: ``initial_replicas`` pods of the version's image."""
    selector = selector_labels(spec.instance, spec.replica_id)
    pod = client.V1PodSpec(
        containers=[_container(spec)],
        # Scorers never call the Kubernetes API: no token in their pods.
        automount_service_account_token=False,
        # No Service environment variables: nothing reads them, and with many replicas
        # in a namespace they grow every pod's environment.
        enable_service_links=False,
        # The pause container becomes pid 1, so `mlflow models serve` gets the default
        # SIGTERM handling (a plain pid 1 ignores it and would wait for SIGKILL).
        share_process_namespace=True,
        # preStop sleep, then uvicorn's own shutdown of in-flight requests.
        termination_grace_period_seconds=spec.drain_seconds + 30,
        security_context=client.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=_UID,
            run_as_group=_GID,
            fs_group=_GID,
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource())],
        image_pull_secrets=(
            [client.V1LocalObjectReference(name=spec.image_pull_secret)]
            if spec.image_pull_secret
            else None
        ),
    )
    return client.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=_metadata(spec, None),
        spec=client.V1DeploymentSpec(
            replicas=spec.initial_replicas,
            selector=client.V1LabelSelector(match_labels=selector),
            # Fails the rollout by itself (condition Progressing=False) a little after
            # the controller's own deadline, for anyone watching with kubectl.
            progress_deadline_seconds=int(spec.startup_seconds) + 60,
            revision_history_limit=1,
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=spec.labels),
                spec=pod,
            ),
        ),
    )


def owner_reference(created: client.V1Deployment) -> client.V1OwnerReference:
    """A reference to the created Deployment: the cluster's garbage collector deletes
    the Service, HPA and PDB with it, even when a controller dies halfway through."""
    return client.V1OwnerReference(
        api_version="apps/v1",
        kind="Deployment",
        name=created.metadata.name,
        uid=created.metadata.uid,
    )


def service(spec: ReplicaSpec, owner: client.V1OwnerReference | None) -> client.V1Service:
    """The replica's ClusterIP Service: its stable URL for the gateway and smoke test."""
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=_metadata(spec, owner),
        spec=client.V1ServiceSpec(
            type="ClusterIP",
            selector=selector_labels(spec.instance, spec.replica_id),
            ports=[
                client.V1ServicePort(
                    name="http", port=spec.service_port, target_port="http", protocol="TCP"
                )
            ],
        ),
    )


def autoscaler(
    spec: ReplicaSpec, owner: client.V1OwnerReference | None
) -> client.V2HorizontalPodAutoscaler | None:
    """The replica's HorizontalPodAutoscaler, when its model's tag asks for one."""
    scaling = spec.options.autoscaling
    if scaling is None:
        return None
    if scaling.cpu_percent is not None:
        metric = client.V2MetricSpec(
            type="Resource",
            resource=client.V2ResourceMetricSource(
                name="cpu",
                target=client.V2MetricTarget(
                    type="Utilization", average_utilization=scaling.cpu_percent
                ),
            ),
        )
    else:
        metric = client.V2MetricSpec(
            type="Pods",
            pods=client.V2PodsMetricSource(
                metric=client.V2MetricIdentifier(name=scaling.metric),
                target=client.V2MetricTarget(
                    type="AverageValue", average_value=f"{scaling.requests_per_second:g}"
                ),
            ),
        )
    return client.V2HorizontalPodAutoscaler(
        api_version="autoscaling/v2",
        kind="HorizontalPodAutoscaler",
        metadata=_metadata(spec, owner),
        spec=client.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=client.V2CrossVersionObjectReference(
                api_version="apps/v1", kind="Deployment", name=spec.name
            ),
            min_replicas=scaling.min_replicas,
            max_replicas=scaling.max_replicas,
            metrics=[metric],
        ),
    )


def disruption_budget(
    spec: ReplicaSpec, owner: client.V1OwnerReference | None
) -> client.V1PodDisruptionBudget | None:
    """The replica's PodDisruptionBudget, when its model's tag asks for one."""
    budget = spec.options.budget
    if budget is None:
        return None
    return client.V1PodDisruptionBudget(
        api_version="policy/v1",
        kind="PodDisruptionBudget",
        metadata=_metadata(spec, owner),
        spec=client.V1PodDisruptionBudgetSpec(
            min_available=budget.min_available,
            max_unavailable=budget.max_unavailable,
            selector=client.V1LabelSelector(
                match_labels=selector_labels(spec.instance, spec.replica_id)
            ),
            # A pod that never became ready is not protected: a drain may evict it.
            unhealthy_pod_eviction_policy="AlwaysAllow",
        ),
    )


def service_url(name: str, namespace: str, port: int) -> str:
    """The cluster DNS URL of a replica's Service."""
    return f"http://{name}.{namespace}.svc.cluster.local:{port}"
