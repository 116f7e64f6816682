"""A small in-memory Kubernetes API: the one fake the Kubernetes tests share.

No cluster can run on this project's machines, so `FakeCluster` stands in for the API
server behind the official client's typed APIs. It stores objects as the server does,
as JSON by (kind, namespace, name), and answers with the client's own model classes
(deserialized by ``ApiClient``), so code under test reads exactly the types a real
cluster returns. What it keeps of the server's behaviour:

* create: 409 AlreadyExists for a taken name; uid, creationTimestamp, generation and
  a resourceVersion assigned; a Service gets a clusterIP;
* read / replace / patch / delete: 404 NotFound for a missing object, raised as
  ``kubernetes.client.exceptions.ApiException`` with a JSON ``Status`` body;
* replace with a stale ``metadata.resourceVersion``: 409 Conflict (optimistic
  concurrency, which Lease-based leader election relies on); without one: unconditional;
* every write bumps the resourceVersion, a spec change bumps the generation;
* patch: a JSON merge patch (what strategic merge does for the fields patched here);
* list with label selectors (``k=v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``,
  ``k notin (a,b)``).

There is no kubelet: `kubelet` decides what becomes of a Deployment's pods when it is
created or rescaled (`READY` by default, `PENDING`, or a `Failing` reason), and
`mark_ready` / `mark_failing` change it later. Deleting a Deployment deletes its pods;
there is no garbage collection of owned objects. ``calls`` records every API call as
(verb, kind, name) in order, and ``bodies`` the exact bodies sent to create.

Usage: ``fake = FakeCluster(); apis = fake.apis()`` gives a
``serving.backends.k8s_client.KubeApis`` of ``apps``, ``core``, ``autoscaling``,
``policy`` and ``coordination`` fakes.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from serving.backends.k8s_client import KubeApis

Key = tuple[str, str, str]


@dataclass(frozen=True)
class Failing:
    """Pods that cannot come up: a container waiting with ``reason`` (ImagePullBackOff,
    CrashLoopBackOff, ...); a crash loop also shows ``exit_code`` / ``terminated`` as its
    last state and ``log`` as its previous run's output."""

    reason: str
    message: str = ""
    exit_code: int = 1
    terminated: str = "Error"
    log: str = ""


READY = "ready"
PENDING = "pending"
Outcome = str | Failing

# kind: (apiVersion, model type, list type)
KINDS: dict[str, tuple[str, str, str]] = {
    "Deployment": ("apps/v1", "V1Deployment", "V1DeploymentList"),
    "Service": ("v1", "V1Service", "V1ServiceList"),
    "Pod": ("v1", "V1Pod", "V1PodList"),
    "HorizontalPodAutoscaler": (
        "autoscaling/v2",
        "V2HorizontalPodAutoscaler",
        "V2HorizontalPodAutoscalerList",
    ),
    "PodDisruptionBudget": ("policy/v1", "V1PodDisruptionBudget", "V1PodDisruptionBudgetList"),
    "Lease": ("coordination.k8s.io/v1", "V1Lease", "V1LeaseList"),
}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def api_error(status: int, reason: str, message: str) -> ApiException:
    """An ApiException as the client raises it for a server's ``Status`` answer."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": status,
    }
    return ApiException(status=status, reason=reason, body=json.dumps(body))


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: objects merge, None deletes, anything else replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


_TERM = re.compile(
    r"^\s*(!?)([\w./-]+)\s*(?:(==|=|!=)\s*([\w.-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$"
)


def _terms(selector: str) -> list[str]:
    """Split a selector on the commas outside ``( )``."""
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [t for t in [*terms, current] if t.strip()]


def matches(selector: str | None, labels: dict[str, str]) -> bool:
    """Whether ``labels`` satisfy the label selector string ``selector``."""
    for term in _terms(selector or ""):
        found = _TERM.match(term)
        if found is None:
            raise api_error(400, "BadRequest", f"unable to parse requirement: {term!r}")
        negated, key, op, value, set_op, values = found.groups()
        if set_op:
            options = {v.strip() for v in values.split(",")}
            inside = key in labels and labels[key] in options
            if inside != (set_op == "in"):
                return False
        elif op in ("=", "=="):
            if labels.get(key) != value:
                return False
        elif op == "!=":
            if labels.get(key) == value:
                return False
        elif (key in labels) == bool(negated):
            return False
    return True


class FakeCluster:
    """The objects of a pretend cluster, and the API facades that read and write them."""

    def __init__(self, events: list[tuple[Any, ...]] | None = None) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.bodies: list[dict[str, Any]] = []
        self.logs: dict[str, str] = {}  # pod name: previous container run's output
        # Also written into ``events`` (as ("k8s", verb, kind, name)), when given, so a
        # test orders cluster calls against other stubs' events.
        self.events = events
        self.kubelet: Callable[[dict[str, Any]], Outcome] = lambda deployment: READY
        self._lock = threading.RLock()
        self._versions = itertools.count(1)
        self._client = ApiClient()

    def apis(self) -> KubeApis:
        """The typed-API fakes, bundled as the backend takes them."""
        return KubeApis(
            FakeApi(self, APPS),
            FakeApi(self, CORE),
            FakeApi(self, AUTOSCALING),
            FakeApi(self, POLICY),
            FakeApi(self, COORDINATION),
        )

    # -- the store -------------------------------------------------------------------

    def _record(self, verb: str, kind: str, name: str) -> None:
        self.calls.append((verb, kind, name))
        if self.events is not None:
            self.events.append(("k8s", verb, kind, name))

    def _as_model(self, kind: str, data: dict[str, Any] | None, list_of: bool = False) -> Any:
        _, model, list_model = KINDS[kind]
        return self._client.deserialize(json.dumps(data), list_model if list_of else model, None)

    def _json(self, body: Any) -> dict[str, Any]:
        data = self._client.sanitize_for_serialization(body)
        return json.loads(json.dumps(data))  # a deep copy, datetimes as strings

    def _bump(self, obj: dict[str, Any]) -> None:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored JSON of an object, or None (for assertions; a copy)."""
        with self._lock:
            found = self.objects.get((kind, namespace, name))
            return copy.deepcopy(found) if found else None

    def of_kind(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every stored object of ``kind`` (in ``namespace``), as JSON copies."""
        with self._lock:
            return [
                copy.deepcopy(o)
                for (k, ns, _), o in sorted(self.objects.items())
                if k == kind and namespace in (None, ns)
            ]

    def _missing(self, kind: str, name: str) -> ApiException:
        return api_error(404, "NotFound", f'{kind.lower()}s "{name}" not found')

    def create(self, kind: str, namespace: str, body: Any) -> Any:
        """POST: store a new object; 409 if its name is taken."""
        data = self._json(body)
        meta = data.setdefault("metadata", {})
        name = meta.get("name") or ""
        with self._lock:
            self._record("create", kind, name)
            self.bodies.append(copy.deepcopy(data))
            if not name:
                raise api_error(422, "Invalid", f"{kind}: metadata.name: Required value")
            if (kind, namespace, name) in self.objects:
                raise api_error(409, "AlreadyExists", f'{kind.lower()}s "{name}" already exists')
            data.setdefault("apiVersion", KINDS[kind][0])
            data["kind"] = kind
            meta.update(
                namespace=namespace,
                uid=str(uuid.uuid4()),
                creationTimestamp=_now(),
                generation=1,
            )
            if kind == "Service":
                data.setdefault("spec", {}).setdefault(
                    "clusterIP", f"10.96.0.{len(self.objects) % 250 + 2}"
                )
            self._bump(data)
            self.objects[(kind, namespace, name)] = data
            if kind == "Deployment":
                self._run_kubelet(namespace, name, self.kubelet(data))
            return self._as_model(kind, data)

    def read(self, kind: str, namespace: str, name: str) -> Any:
        """GET one object; 404 if it is not there."""
        with self._lock:
            self._record("get", kind, name)
            found = self.objects.get((kind, namespace, name))
            if found is None:
                raise self._missing(kind, name)
            return self._as_model(kind, found)

    def _write(self, kind: str, namespace: str, name: str, data: dict[str, Any]) -> Any:
        old = self.objects[(kind, namespace, name)]
        for kept in ("uid", "creationTimestamp", "namespace", "name"):
            data["metadata"][kept] = old["metadata"][kept]
        changed = data.get("spec") != old.get("spec")
        data["metadata"]["generation"] = old["metadata"]["generation"] + int(changed)
        if "status" in old:
            data["status"] = old["status"]  # status is a subresource: writes keep it
        data["apiVersion"], data["kind"] = old["apiVersion"], kind
        self._bump(data)
        self.objects[(kind, namespace, name)] = data
        if kind == "Deployment" and changed:
            self._run_kubelet(namespace, name, self.kubelet(data))
        return self._as_model(kind, data)

    def replace(self, kind: str, namespace: str, name: str, body: Any) -> Any:
        """PUT: 404 if missing, 409 if the body's resourceVersion is not the stored one."""
        data = self._json(body)
        with self._lock:
            self._record("update", kind, name)
            old = self.objects.get((kind, namespace, name))
            if old is None:
                raise self._missing(kind, name)
            sent = data.setdefault("metadata", {}).get("resourceVersion")
            if sent and sent != old["metadata"]["resourceVersion"]:
                raise api_error(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {kind.lower()}s "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                )
            return self._write(kind, namespace, name, data)

    def patch(self, kind: str, namespace: str, name: str, body: Any) -> Any:
        """PATCH (merge): 404 if missing."""
        patch = self._json(body)
        with self._lock:
            self._record("patch", kind, name)
            old = self.objects.get((kind, namespace, name))
            if old is None:
                raise self._missing(kind, name)
            merged = _merge(copy.deepcopy(old), patch)
            merged["metadata"].pop("resourceVersion", None)
            return self._write(kind, namespace, name, merged)

    def delete(self, kind: str, namespace: str, name: str) -> Any:
        """DELETE: gone at once (no finalizers); a Deployment's pods go with it."""
        with self._lock:
            self._record("delete", kind, name)
            if self.objects.pop((kind, namespace, name), None) is None:
                raise self._missing(kind, name)
            if kind == "Deployment":
                self._delete_pods(namespace, name)
            status = {"kind": "Status", "apiVersion": "v1", "status": "Success"}
            return self._client.deserialize(json.dumps(status), "V1Status", None)

    def list(self, kind: str, namespace: str, label_selector: str | None = None) -> Any:
        """GET a collection, filtered by a label selector."""
        with self._lock:
            self._record("list", kind, label_selector or "")
            items = [
                o
                for (k, ns, _), o in sorted(self.objects.items())
                if k == kind
                and ns == namespace
                and matches(label_selector, o["metadata"].get("labels") or {})
            ]
            data = {
                "apiVersion": KINDS[kind][0],
                "kind": f"{kind}List",
                "metadata": {"resourceVersion": str(next(self._versions))},
                "items": items,
            }
            return self._as_model(kind, data, list_of=True)

    def pod_log(self, namespace: str, name: str) -> str:
        """The previous run's output of a pod's container ('' when none)."""
        with self._lock:
            self._record("get", "Pod/log", name)
            if ("Pod", namespace, name) not in self.objects:
                raise self._missing("Pod", name)
            return self.logs.get(name, "")

    # -- the pretend kubelet ---------------------------------------------------------

    def mark_ready(self, namespace: str, deployment: str) -> None:
        """The Deployment's pods become ready (its status says so)."""
        with self._lock:
            self._run_kubelet(namespace, deployment, READY)

    def mark_failing(self, namespace: str, deployment: str, failing: Failing) -> None:
        """The Deployment's pods cannot come up, for ``failing.reason``."""
        with self._lock:
            self._run_kubelet(namespace, deployment, failing)

    def _delete_pods(self, namespace: str, deployment: str) -> None:
        for key in [k for k in self.objects if k[0] == "Pod" and k[1] == namespace]:
            owner = self.objects[key]["metadata"].get("annotations", {}).get("fake/deployment")
            if owner == deployment:
                del self.objects[key]
                self.logs.pop(key[2], None)

    def _run_kubelet(self, namespace: str, name: str, outcome: Outcome) -> None:
        """Replace the Deployment's pods by ``spec.replicas`` pods in ``outcome``'s state
        and set the Deployment's status from them."""
        deployment = self.objects[("Deployment", namespace, name)]
        self._delete_pods(namespace, name)
        spec = deployment["spec"]
        wanted = spec.get("replicas", 1)
        template = spec["template"]
        container = template["spec"]["containers"][0]["name"]
        for index in range(wanted):
            pod_name = f"{name}-{index}"
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": namespace,
                    "labels": dict(template["metadata"].get("labels") or {}),
                    "annotations": {"fake/deployment": name},
                    "uid": str(uuid.uuid4()),
                },
                "spec": template["spec"],
                "status": _pod_status(container, outcome),
            }
            self._bump(pod)
            self.objects[("Pod", namespace, pod_name)] = pod
            if isinstance(outcome, Failing) and outcome.log:
                self.logs[pod_name] = outcome.log
        ready = wanted if outcome == READY else 0
        deployment["status"] = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": wanted,
            "updatedReplicas": wanted,
            "readyReplicas": ready or None,
            "availableReplicas": ready or None,
            "unavailableReplicas": (wanted - ready) or None,
        }
        deployment["status"] = {k: v for k, v in deployment["status"].items() if v is not None}
        self._bump(deployment)


def _pod_status(container: str, outcome: Outcome) -> dict[str, Any]:
    if outcome == READY:
        state: dict[str, Any] = {"running": {"startedAt": _now()}}
        return {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [
                {
                    "name": container,
                    "ready": True,
                    "restartCount": 0,
                    "state": state,
                    "image": "x",
                    "imageID": "x",
                }
            ],
        }
    if outcome == PENDING:
        waiting = {"waiting": {"reason": "ContainerCreating"}}
        return {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": container,
                    "ready": False,
                    "restartCount": 0,
                    "state": waiting,
                    "image": "x",
                    "imageID": "",
                }
            ],
        }
    assert isinstance(outcome, Failing), outcome
    crashed = outcome.reason == "CrashLoopBackOff"
    status: dict[str, Any] = {
        "name": container,
        "ready": False,
        "restartCount": 3 if crashed else 0,
        "state": {"waiting": {"reason": outcome.reason, "message": outcome.message}},
        "image": "x",
        "imageID": "",
    }
    if crashed:
        status["lastState"] = {
            "terminated": {"exitCode": outcome.exit_code, "reason": outcome.terminated}
        }
    return {"phase": "Pending" if not crashed else "Running", "containerStatuses": [status]}


# The methods each typed API exposes, by resource (the client's method name part).
APPS = {"deployment": "Deployment"}
CORE = {"service": "Service", "pod": "Pod"}
AUTOSCALING = {"horizontal_pod_autoscaler": "HorizontalPodAutoscaler"}
POLICY = {"pod_disruption_budget": "PodDisruptionBudget"}
COORDINATION = {"lease": "Lease"}
_METHOD = re.compile(r"^(create|read|replace|patch|delete|list)_namespaced_(\w+)$")


class FakeApi:
    """One typed API (AppsV1Api, CoreV1Api, ...): ``<verb>_namespaced_<resource>`` for
    its resources, with the real methods' positional order; keyword options such as
    ``_request_timeout`` or ``propagation_policy`` are accepted and ignored."""

    def __init__(self, cluster: FakeCluster, resources: dict[str, str]) -> None:
        self._cluster = cluster
        self._resources = resources

    def read_namespaced_pod_log(self, name: str, namespace: str, **_: Any) -> str:
        """CoreV1Api.read_namespaced_pod_log: the previous run's output."""
        if "pod" not in self._resources:
            raise AttributeError("read_namespaced_pod_log")
        return self._cluster.pod_log(namespace, name)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        found = _METHOD.match(method)
        if found is None or found.group(2) not in self._resources:
            raise AttributeError(method)
        verb, kind = found.group(1), self._resources[found.group(2)]
        cluster = self._cluster
        if verb == "create":
            return lambda namespace, body, **_: cluster.create(kind, namespace, body)
        if verb == "read":
            return lambda name, namespace, **_: cluster.read(kind, namespace, name)
        if verb == "replace":
            return lambda name, namespace, body, **_: cluster.replace(kind, namespace, name, body)
        if verb == "patch":
            return lambda name, namespace, body, **_: cluster.patch(kind, namespace, name, body)
        if verb == "delete":
            return lambda name, namespace, **_: cluster.delete(kind, namespace, name)
        return lambda namespace, label_selector=None, **_: cluster.list(
            kind, namespace, label_selector
        )
