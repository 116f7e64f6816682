"""`flowline k8s render`: a Kustomize base that runs every flowline role on Kubernetes.

One folder, applied with ``kubectl apply -k DIR``: the tracking server (PostgreSQL
backend, artifacts on S3 or a PersistentVolumeClaim), the controller with a
least-privilege ServiceAccount, the gateway (Deployment, Service, HorizontalPodAutoscaler,
PodDisruptionBudget; one pod by default, see ``RenderOptions``) and the monitor. Around them:

* one Secret for the tokens and the database URLs (``stringData``, file mode 0600),
  generated here with fresh random tokens; nothing secret is in the ConfigMap;
* NetworkPolicies: everything in the namespace is denied ingress by default, then each
  role is opened to whom it serves: scoring replicas (label ``flowline.role=replica``)
  only to the gateway and the controller, the controller only to the tracking server
  (webhooks) and the gateway (``_network_policies`` has the rules);
* readiness and liveness probes on every container, and a restricted securityContext
  (non-root, read-only root filesystem with an ``emptyDir`` for /tmp and the home, no
  privilege escalation, all capabilities dropped, RuntimeDefault seccomp).

Kustomize rather than Helm: the output is plain manifests a reviewer can read and
``kubectl diff``, overlays patch them without a template language, and ``kubectl``
applies them with no extra tool. Every manifest is validated offline against the
Kubernetes OpenAPI schemas in the tests (tests/test_k8s_manifests.py).

Several instances of each role (docs/scaling.md): controllers elect one leader with a
``coordination.k8s.io`` Lease and run replicas as Deployments of their own through the
Kubernetes backend (``serving/backends/kubernetes.py``); gateways converge to the routes
the leader publishes in the tracking server's PostgreSQL database and are found by pod
IP (the downward API); monitors share the monitor's PostgreSQL store.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROLE_LABEL = "flowline.role"
APP = "flowline"
SECRET = "flowline-secrets"
CONFIG = "flowline-config"
PORTS = {"tracking": 5000, "gateway": 8080, "controller": 8081, "monitor": 8082}
HOME = "/var/lib/flowline"
RUN_AS = 10001


@dataclass(frozen=True)
class RenderOptions:
    """What the base is rendered for (the command line's options)."""

    image: str = "flowline:latest"
    namespace: str = "flowline"
    database_url: str = "postgresql://flowline@postgres:5432/mlflow"
    monitor_database_url: str = "postgresql://flowline@postgres:5432/flowline_monitor"
    artifacts: str = "pvc"  # "pvc", or an s3:// URI (credentials from the Secret)
    # Two of each stateless role, so one pod's loss (a node drain) interrupts nothing.
    gateways: int = 2
    max_gateways: int = 6
    controllers: int = 2
    monitors: int = 1


def _labels(role: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": role, ROLE_LABEL: role}


def _meta(name: str, role: str) -> dict[str, Any]:
    return {"name": name, "labels": _labels(role)}


def _security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _probe(path: str, port: int, period: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 3}


def _container(
    role: str, options: RenderOptions, command: list[str], health: str, env: list[dict[str, Any]]
) -> dict[str, Any]:
    port = PORTS[role]
    return {
        "name": role,
        "image": options.image,
        "command": command,
        "ports": [{"name": "http", "containerPort": port}],
        "envFrom": [{"configMapRef": {"name": CONFIG}}],
        "env": env,
        "readinessProbe": _probe(health, port, 5),
        "livenessProbe": {**_probe(health, port, 10), "failureThreshold": 6},
        "resources": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "2Gi"},
        },
        "securityContext": _security(),
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "home", "mountPath": HOME},
        ],
    }


def _secret_env(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": SECRET, "key": key}}}
        for name, key in pairs
    ]


def _advertised(role: str) -> list[dict[str, Any]]:
    """FLOWLINE_ADVERTISE_URL from the pod's IP: the leader pushes to every gateway pod,
    not to the Service (which reaches one pod per call), and webhooks find the leader."""
    pod_ip = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    url = {"name": "FLOWLINE_ADVERTISE_URL", "value": f"http://$(POD_IP):{PORTS[role]}"}
    return [pod_ip, url]


def _deployment(
    role: str,
    replicas: int,
    container: dict[str, Any],
    service_account: str | None = None,
    home: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Deployment of one container; ``home`` is the volume at the flowline home
    (default an ``emptyDir``: every role but the tracking server keeps its state in the
    stores)."""
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "fsGroup": RUN_AS},
        "automountServiceAccountToken": service_account is not None,
        # The gateway drains in-flight requests on SIGTERM; give it the time to.
        "terminationGracePeriodSeconds": 45,
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "home", **(home or {"emptyDir": {}})},
        ],
    }
    if service_account:
        spec["serviceAccountName"] = service_account
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(f"flowline-{role}", role),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {ROLE_LABEL: role, "app.kubernetes.io/name": APP}},
            "template": {"metadata": {"labels": _labels(role)}, "spec": spec},
        },
    }


def _service(role: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(f"flowline-{role}", role),
        "spec": {
            "selector": {ROLE_LABEL: role, "app.kubernetes.io/name": APP},
            "ports": [{"name": "http", "port": PORTS[role], "targetPort": "http"}],
        },
    }


def _tracking(options: RenderOptions) -> list[dict[str, Any]]:
    artifacts = options.artifacts if options.artifacts != "pvc" else f"{HOME}/artifacts"
    command = [
        "mlflow", "server", "--host", "0.0.0.0", "--port", str(PORTS["tracking"]),
        "--backend-store-uri", "$(FLOWLINE_BACKEND_STORE_URI)",
        "--artifacts-destination", artifacts,
    ]  # fmt: skip
    env = _secret_env(("FLOWLINE_BACKEND_STORE_URI", "database-url"))
    if options.artifacts.startswith("s3://"):
        env += _secret_env(
            ("AWS_ACCESS_KEY_ID", "s3-access-key-id"),
            ("AWS_SECRET_ACCESS_KEY", "s3-secret-access-key"),
        )
    container = _container("tracking", options, command, "/health", env)
    if options.artifacts != "pvc":
        return [_deployment("tracking", 1, container), _service("tracking")]
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta("flowline-artifacts", "tracking"),
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "20Gi"}}},
    }
    home = {"persistentVolumeClaim": {"claimName": "flowline-artifacts"}}
    deployment = _deployment("tracking", 1, container, home=home)
    deployment["spec"]["strategy"] = {"type": "Recreate"}  # one pod at a time on the volume
    return [claim, deployment, _service("tracking")]


def _controller(options: RenderOptions) -> list[dict[str, Any]]:
    command = [
        "python", "-m", "serving.controller", "--host", "0.0.0.0",
        "--port", str(PORTS["controller"]), "--home", HOME,
    ]  # fmt: skip
    env = _secret_env(
        ("FLOWLINE_ADMIN_TOKEN", "admin-token"),
        ("FLOWLINE_WEBHOOK_SECRET", "webhook-secret"),
        ("FLOWLINE_COORDINATION_URL", "database-url"),
    ) + _advertised("controller")
    container = _container("controller", options, command, "/health", env)
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta("flowline-controller", "controller"),
        "automountServiceAccountToken": True,
    }
    # Least privilege, in its own namespace only: what a serving backend manages per model
    # version, and the Lease that leader election takes.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta("flowline-controller", "controller"),
        "rules": [
            {
                "apiGroups": ["apps"],
                "resources": ["deployments"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            },
            {
                "apiGroups": [""],
                "resources": ["services"],
                "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
            },
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            # The last line a crash-looping scorer wrote goes into the rollout's reason.
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
            {
                "apiGroups": ["autoscaling"],
                "resources": ["horizontalpodautoscalers"],
                "verbs": ["get", "list", "create", "update", "patch", "delete"],
            },
            {
                "apiGroups": ["policy"],
                "resources": ["poddisruptionbudgets"],
                "verbs": ["get", "list", "create", "update", "patch", "delete"],
            },
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "verbs": ["get", "create", "update"],
            },
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta("flowline-controller", "controller"),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "flowline-controller",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "flowline-controller"}],
    }
    # One leads (the Lease), the others take over within two reconcile intervals.
    deployment = _deployment(
        "controller", options.controllers, container, service_account="flowline-controller"
    )
    return [account, role, binding, deployment, _service("controller")]


def _gateway(options: RenderOptions) -> list[dict[str, Any]]:
    command = ["python", "-m", "serving.gateway", "--host", "0.0.0.0", "--port", "8080"]
    env = _secret_env(
        ("FLOWLINE_ADMIN_TOKEN", "admin-token"),
        ("FLOWLINE_API_KEYS", "api-keys"),
        ("FLOWLINE_INGEST_TOKEN", "ingest-token"),
        ("FLOWLINE_COORDINATION_URL", "database-url"),
    ) + _advertised("gateway")
    container = _container("gateway", options, command, "/ping", env)
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "flowline-gateway"}
    cpu = {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta("flowline-gateway", "gateway"),
        "spec": {
            "scaleTargetRef": target,
            "minReplicas": options.gateways,
            "maxReplicas": max(options.max_gateways, options.gateways),
            "metrics": [{"type": "Resource", "resource": cpu}],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta("flowline-gateway", "gateway"),
        # One pod may be down for a voluntary disruption (a node drain) at a time.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {ROLE_LABEL: "gateway"}}},
    }
    deployment = _deployment("gateway", options.gateways, container)
    return [deployment, _service("gateway"), autoscaler, budget]


def _monitor(options: RenderOptions) -> list[dict[str, Any]]:
    command = ["python", "-m", "monitoring", "--host", "0.0.0.0", "--port", "8082", "--home", HOME]
    env = _secret_env(
        ("FLOWLINE_MONITOR_DB", "monitor-database-url"),
        ("FLOWLINE_INGEST_TOKEN", "ingest-token"),
        ("FLOWLINE_FEEDBACK_TOKEN", "feedback-token"),
    )
    container = _container("monitor", options, command, "/health", env)
    return [_deployment("monitor", options.monitors, container), _service("monitor")]


def _allow(role: str, sources: list[str] | None, port: int) -> dict[str, Any]:
    """Ingress to ``role`` on ``port`` from the roles ``sources`` (None: from anywhere)."""
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": port}]}
    if sources is not None:
        rule["from"] = [{"podSelector": {"matchLabels": {ROLE_LABEL: s}}} for s in sources]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(f"flowline-{role}-ingress", role),
        "spec": {
            "podSelector": {"matchLabels": {ROLE_LABEL: role}},
            "policyTypes": ["Ingress"],
            "ingress": [rule],
        },
    }


def _network_policies() -> list[dict[str, Any]]:
    deny = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("flowline-default-deny", "platform"),
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    return [
        deny,
        # Clients score through the gateway; its admin API is guarded by the admin token.
        _allow("gateway", None, PORTS["gateway"]),
        # Replicas answer the gateway (scoring) and the controller (health, smoke test).
        _allow("replica", ["gateway", "controller"], 8080),
        # The controller's webhook receiver and status: the tracking server and the gateway.
        _allow("controller", ["tracking", "gateway"], PORTS["controller"]),
        # Captures from the gateway; labels (POST /feedback, bearer token) from anywhere.
        _allow("monitor", None, PORTS["monitor"]),
        # The registry UI and API: users, the controller, the monitor, training jobs.
        _allow("tracking", None, PORTS["tracking"]),
    ]


def _config(options: RenderOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(CONFIG, "platform"),
        "data": {
            "FLOWLINE_HOME": HOME,
            "MLFLOW_TRACKING_URI": f"http://flowline-tracking:{PORTS['tracking']}",
            "FLOWLINE_GATEWAY_URL": f"http://flowline-gateway:{PORTS['gateway']}",
            "FLOWLINE_MONITOR_URL": f"http://flowline-monitor:{PORTS['monitor']}",
            "FLOWLINE_CONTROLLER_URL": f"http://flowline-controller:{PORTS['controller']}",
            # Replicas as Deployments of their own, labelled for this platform, so that
            # whichever controller leads adopts them; the leader holds a Lease.
            "FLOWLINE_BACKEND": "kubernetes",
            "FLOWLINE_K8S_NAMESPACE": options.namespace,
            "FLOWLINE_K8S_INSTANCE": APP,
            "FLOWLINE_LEADER_ELECTION": "kubernetes",
        },
    }


def _secret(options: RenderOptions) -> dict[str, Any]:
    data = {
        "admin-token": secrets.token_urlsafe(32),
        "webhook-secret": secrets.token_urlsafe(32),
        "api-keys": secrets.token_urlsafe(32),
        "ingest-token": secrets.token_urlsafe(32),
        "feedback-token": secrets.token_urlsafe(32),
        "database-url": options.database_url,
        "monitor-database-url": options.monitor_database_url,
    }
    if options.artifacts.startswith("s3://"):
        data |= {"s3-access-key-id": "CHANGE-ME", "s3-secret-access-key": "CHANGE-ME"}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(SECRET, "platform"),
        "type": "Opaque",
        "stringData": data,
    }


def resources(options: RenderOptions) -> dict[str, list[dict[str, Any]]]:
    """Every manifest of the base, by the file it is written to."""
    return {
        "config.yaml": [_config(options)],
        "secret.yaml": [_secret(options)],
        "tracking.yaml": _tracking(options),
        "controller.yaml": _controller(options),
        "gateway.yaml": _gateway(options),
        "monitor.yaml": _monitor(options),
        "network-policies.yaml": _network_policies(),
    }


def render(target: Path, options: RenderOptions) -> list[Path]:
    """Write the base into ``target`` (created 0700); the Secret's file is 0600."""
    if options.artifacts != "pvc" and not options.artifacts.startswith("s3://"):
        raise ValueError(f"artifacts must be 'pvc' or an s3:// URI, got {options.artifacts!r}")
    if min(options.gateways, options.controllers, options.monitors) < 1:
        raise ValueError("gateways, controllers and monitors must be at least 1")
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = resources(options)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": options.namespace,
        "resources": list(files),
    }
    written = []
    for name, docs in {**files, "kustomization.yaml": [kustomization]}.items():
        path = target / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump_all(docs, handle, sort_keys=False)
        os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
        written.append(path)
    return written
