"""The Kubernetes backend against the shared in-memory API (tests/k8s_fake.py).

No cluster runs here: the fake stands in for the API server behind the official
client's typed APIs, answering with the client's own models. The tests cover the
backend's contract with the reconciler (ready before it returns, one-line failures that
leave nothing, idempotent stops, adoption by label, stop_all of its own objects only),
the objects it writes (labels, probes, limits, securityContext, optional HPA and PDB,
each validated offline with kubernetes-validate for the two newest Kubernetes versions
it ships), the image push with a stub Docker client, the RBAC it needs, and the real
Reconciler's blue/green rollout driven over it end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import requests

import serving.controller.reconciler as reconciler_module
from common.registry import RESOURCES_MODEL_TAG, STATUS_TAG
from flowline import k8s as manifests
from serving.backends import k8s_objects as objects
from serving.backends.base import BackendError, Replica
from serving.backends.k8s_client import KubernetesSettings, load_apis
from serving.backends.k8s_images import RegistryPublisher
from serving.backends.kubernetes import KubernetesBackend
from serving.controller.reconciler import Reconciler
from serving.images.builder import BuiltImage
from tests.conftest import REPO
from tests.k8s_fake import PENDING, READY, Failing, FakeCluster, api_error, matches
from tests.test_k8s_manifests import newest_versions
from tests.test_reconciler import StubGateway, StubRegistry

NS = "ml"
HOME = Path("/var/lib/flowline")
HPA_CPU = {"hpa": {"min": 2, "max": 5, "cpu": 70}, "pdb": {"minAvailable": 1}}
HPA_RPS = {"hpa": {"max": 4, "rps": 25}, "pdb": {"maxUnavailable": 1}}


class StubImages:
    """The image source: a reference per version, no build, no push."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def reference(self, model: str, version: str, model_uri: str) -> str:
        self.asked.append((model, version))
        return f"registry.test/flowline-model/{model.lower()}:v{version}-0123456789abcdef"


def make_backend(
    fake: FakeCluster,
    tags: dict[str, dict[str, str]] | None = None,
    home: Path = HOME,
    timeout: float = 2.0,
    **settings: Any,
) -> KubernetesBackend:
    """A backend on ``fake``, its models' tags from ``tags``, polling fast."""
    tags = tags if tags is not None else {}
    return KubernetesBackend(
        "http://tracking.test",
        home,
        settings=KubernetesSettings(k8s_namespace=NS, k8s_ready_timeout_s=timeout, **settings),
        apis=fake.apis(),
        images=StubImages(),
        tags_of=lambda model: tags.get(model, {}),
        poll_interval=0.01,
    )


@pytest.fixture
def fake() -> FakeCluster:
    return FakeCluster()


def kinds(fake: FakeCluster) -> dict[str, list[str]]:
    """Names of the stored objects by kind (pods left out)."""
    found: dict[str, list[str]] = {}
    for kind, _, name in sorted(fake.objects):
        if kind != "Pod":
            found.setdefault(kind, []).append(name)
    return found


# -- start: ready before it returns, through the Service -----------------------------------


def test_a_replica_is_a_deployment_and_its_service_ready_before_start_returns(fake) -> None:
    backend = make_backend(fake)
    replica = backend.start_replica("Iris Model", "3", "models:/Iris Model/3")

    name = replica.handle
    assert replica.url == f"http://{name}.{NS}.svc.cluster.local:8080"
    assert (replica.model, replica.version) == ("Iris Model", "3")
    assert kinds(fake) == {"Deployment": [name], "Service": [name]}
    assert backend.is_alive(replica)
    stored = fake.get("Deployment", NS, name)
    assert stored["status"]["readyReplicas"] == 1
    service = fake.get("Service", NS, name)
    assert service["spec"]["selector"] == stored["spec"]["selector"]["matchLabels"]
    # The Service's pods are exactly the Deployment's: the replica id selects them.
    assert service["spec"]["selector"][objects.REPLICA] == name.rsplit("-", 1)[1]
    assert service["metadata"]["ownerReferences"][0]["uid"] == stored["metadata"]["uid"]


def test_start_waits_for_the_pods_to_become_ready(fake) -> None:
    fake.kubelet = lambda deployment: PENDING
    backend = make_backend(fake)
    created = threading.Event()
    fake.events = []

    def kubelet_later() -> None:
        while not fake.of_kind("Deployment"):
            threading.Event().wait(0.01)
        threading.Event().wait(0.1)
        created.set()
        fake.mark_ready(NS, fake.of_kind("Deployment")[0]["metadata"]["name"])

    thread = threading.Thread(target=kubelet_later)
    thread.start()
    replica = backend.start_replica("m", "1", "models:/m/1")
    thread.join()
    assert created.is_set() and backend.is_alive(replica)
    polls = [e for e in fake.events if e[1:3] == ("get", "Deployment")]
    assert len(polls) > 1  # it did wait


def test_the_object_carries_labels_probes_limits_and_a_restricted_security_context(
    fake,
) -> None:
    tags = {"m": {RESOURCES_MODEL_TAG: json.dumps({"cpus": 0.5, "memory": "768m"})}}
    backend = make_backend(fake, tags, k8s_drain_s=7, k8s_workers=2)
    replica = backend.start_replica("m", "12", "models:/m/12")

    deployment = fake.get("Deployment", NS, replica.handle)
    labels = deployment["metadata"]["labels"]
    assert labels[objects.MANAGED_BY] == "flowline"
    assert labels[objects.INSTANCE] == backend.instance
    assert labels[objects.MODEL] == "m" and labels[objects.VERSION] == "12"
    assert labels[objects.ROLE] == "replica"
    assert deployment["metadata"]["annotations"][objects.HOME_ANNOTATION] == str(HOME)
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["template"]["metadata"]["labels"] == labels
    (container,) = pod["containers"]
    assert container["image"].startswith("registry.test/flowline-model/m:v12-")
    assert container["args"] == ["-h", "0.0.0.0", "-p", "8080", "-w", "2"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # From the flowline.resources tag, parsed by the docker backend's own parser.
    quantity = {"cpu": "500m", "memory": "768Mi"}
    assert container["resources"] == {"requests": quantity, "limits": quantity}
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert pod["terminationGracePeriodSeconds"] == 37
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["volumeMounts"] == [{"mountPath": "/tmp", "name": "tmp"}]
    assert pod["volumes"] == [{"emptyDir": {}, "name": "tmp"}]
    assert pod["automountServiceAccountToken"] is False


def test_the_replica_role_label_and_port_are_the_ones_the_network_policy_opens() -> None:
    policies = manifests.resources(manifests.RenderOptions())["network-policies.yaml"]
    replica = next(
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels") == {manifests.ROLE_LABEL: "replica"}
    )
    assert objects.ROLE == manifests.ROLE_LABEL
    assert replica["spec"]["ingress"][0]["ports"][0]["port"] == objects.CONTAINER_PORT


def test_a_long_model_name_still_makes_a_valid_service_name() -> None:
    name = objects.object_name("My_Very.Long Model Name " * 5, "1234567890123", "abcd1234")
    assert len(name) <= 63 and name.startswith("flowline-") and name.endswith("-abcd1234")
    assert all(c.isalnum() or c == "-" for c in name) and name == name.lower()
    assert objects.label_value("  weird/name!! ") == "weird-name"


# -- start failures: one line, nothing left --------------------------------------------------


@pytest.mark.parametrize(
    ("failing", "expected"),
    [
        (
            Failing("ImagePullBackOff", 'Back-off pulling image "registry.test/x:v1"'),
            'failed: ImagePullBackOff: Back-off pulling image "registry.test/x:v1"',
        ),
        (
            Failing("CrashLoopBackOff", "back-off 10s", log="loading\nValueError: no model\n"),
            "failed: CrashLoopBackOff: exited 1 (Error): ValueError: no model",
        ),
        (
            Failing("CrashLoopBackOff", "", exit_code=137, terminated="OOMKilled"),
            "failed: CrashLoopBackOff: killed for memory (raise flowline.resources)",
        ),
    ],
    ids=["image-pull", "crash-loop", "oom"],
)
def test_a_replica_that_cannot_come_up_fails_fast_in_one_line_and_leaves_nothing(
    fake, failing: Failing, expected: str
) -> None:
    fake.kubelet = lambda deployment: failing
    backend = make_backend(fake, {"m": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_CPU)}})
    with pytest.raises(BackendError) as raised:
        backend.start_replica("m", "1", "models:/m/1")
    message = str(raised.value)
    assert message.startswith("replica of m/1 ") and expected in message
    assert "\n" not in message
    assert fake.objects == {}


def test_a_replica_not_ready_by_the_deadline_fails_with_what_it_waited_for(fake) -> None:
    fake.kubelet = lambda deployment: PENDING
    backend = make_backend(fake, timeout=0.2)
    with pytest.raises(BackendError, match=r"was not ready within 0.2 s: 0/1 ready, Container"):
        backend.start_replica("m", "1", "models:/m/1")
    assert fake.objects == {}


def test_a_refused_create_is_a_backend_error_and_removes_what_was_created(fake) -> None:
    backend = make_backend(fake)
    real_create = fake.create

    def refuse_services(kind: str, namespace: str, body: Any) -> Any:
        if kind == "Service":
            raise api_error(403, "Forbidden", 'services is forbidden: User "x" cannot create')
        return real_create(kind, namespace, body)

    fake.create = refuse_services  # type: ignore[method-assign]
    with pytest.raises(BackendError, match="the Kubernetes API answered 403: services is forbid"):
        backend.start_replica("m", "1", "models:/m/1")
    assert fake.objects == {}


@pytest.mark.parametrize(
    ("tag", "value", "expected"),
    [
        (RESOURCES_MODEL_TAG, '{"cpus": "lots"}', "flowline.resources="),
        (objects.KUBERNETES_MODEL_TAG, '{"hpa": {"max": 3}}', "exactly one target"),
        (objects.KUBERNETES_MODEL_TAG, '{"hpa": {"min": 4, "max": 2, "cpu": 5}}', "at least"),
        (objects.KUBERNETES_MODEL_TAG, '{"pdb": {"minAvailable": 1, "maxUnavailable": 1}}', "one"),
        (objects.KUBERNETES_MODEL_TAG, '{"replicas": 3}', "keys hpa and/or pdb"),
        (objects.KUBERNETES_MODEL_TAG, "not json", "flowline.kubernetes='not json' is invalid"),
    ],
)
def test_a_bad_tag_fails_before_any_image_or_object(fake, tag, value, expected) -> None:
    backend = make_backend(fake, {"m": {tag: value}})
    with pytest.raises(BackendError, match=expected.replace("(", r"\(")):
        backend.start_replica("m", "1", "models:/m/1")
    assert backend.images.asked == [] and fake.calls == []


def test_a_taken_name_gets_a_new_replica_id_and_the_other_is_untouched(fake, monkeypatch) -> None:
    backend = make_backend(fake)
    first = backend.start_replica("m", "1", "models:/m/1")
    taken = first.handle.rsplit("-", 1)[1]
    real = backend.spec_for
    # The first id drawn is the taken one; the retry draws a fresh one.
    monkeypatch.setattr(backend, "spec_for", lambda *a: replace(real(*a), replica_id=taken))
    monkeypatch.setattr("serving.backends.kubernetes.new_replica_id", lambda: "feedbeef")
    second = backend.start_replica("m", "1", "models:/m/1")
    assert second.handle.endswith("-feedbeef")
    assert backend.is_alive(first) and backend.is_alive(second)


# -- stop: scale to zero, delete, idempotent ------------------------------------------------


def test_stop_removes_the_hpa_scales_to_zero_then_deletes_everything_idempotently(fake) -> None:
    backend = make_backend(fake, {"m": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_CPU)}})
    replica = backend.start_replica("m", "1", "models:/m/1")
    assert set(kinds(fake)) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    fake.calls.clear()
    backend.stop_replica(replica)
    name = replica.handle
    assert fake.calls == [
        ("delete", "HorizontalPodAutoscaler", name),
        ("patch", "Deployment", name),
        ("delete", "Service", name),
        ("delete", "PodDisruptionBudget", name),
        ("delete", "Deployment", name),
    ]
    assert fake.objects == {}
    backend.stop_replica(replica)  # every object is gone: 404s are fine
    assert not backend.is_alive(replica)
    # A replica known only by its URL (no handle) is found by its Service name.
    assert backend.is_alive(Replica("m", "1", replica.url)) is False


def test_the_scale_to_zero_reaches_the_cluster_before_the_delete(fake) -> None:
    backend = make_backend(fake)
    replica = backend.start_replica("m", "1", "models:/m/1")
    seen: list[int] = []
    real_delete = fake.delete

    def delete(kind: str, namespace: str, name: str) -> Any:
        if kind == "Deployment":
            seen.append(fake.get(kind, namespace, name)["spec"]["replicas"])
        return real_delete(kind, namespace, name)

    fake.delete = delete  # type: ignore[method-assign]
    backend.stop_replica(replica)
    assert seen == [0]


def test_a_replica_whose_pods_died_is_not_alive(fake) -> None:
    backend = make_backend(fake)
    replica = backend.start_replica("m", "1", "models:/m/1")
    fake.mark_failing(NS, replica.handle, Failing("CrashLoopBackOff"))
    assert not backend.is_alive(replica)


# -- HPA and PDB from the flowline.kubernetes tag ------------------------------------------


def test_the_tag_adds_a_cpu_hpa_and_a_min_available_pdb(fake) -> None:
    backend = make_backend(fake, {"m": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_CPU)}})
    replica = backend.start_replica("m", "1", "models:/m/1")
    name = replica.handle
    hpa = fake.get("HorizontalPodAutoscaler", NS, name)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 5)
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 70},
            },
        }
    ]
    # The Deployment starts at the HPA's minimum and is ready only with all of them.
    assert fake.get("Deployment", NS, name)["spec"]["replicas"] == 2
    pdb = fake.get("PodDisruptionBudget", NS, name)
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"][objects.REPLICA] == name.rsplit("-", 1)[1]


def test_the_tag_adds_a_requests_per_second_hpa_and_a_max_unavailable_pdb(fake) -> None:
    backend = make_backend(fake, {"m": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_RPS)}})
    name = backend.start_replica("m", "1", "models:/m/1").handle
    metric = fake.get("HorizontalPodAutoscaler", NS, name)["spec"]["metrics"][0]
    assert metric == {
        "type": "Pods",
        "pods": {
            "metric": {"name": objects.DEFAULT_RPS_METRIC},
            "target": {"type": "AverageValue", "averageValue": "25"},
        },
    }
    assert fake.get("PodDisruptionBudget", NS, name)["spec"]["maxUnavailable"] == 1


def test_without_the_tag_there_is_no_hpa_and_no_pdb(fake) -> None:
    make_backend(fake).start_replica("m", "1", "models:/m/1")
    assert set(kinds(fake)) == {"Deployment", "Service"}


# -- every object validates offline ----------------------------------------------------------


def test_every_object_the_backend_creates_validates_for_the_two_newest_versions(fake) -> None:
    tags = {
        "cpu": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_CPU)},
        "rps": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_RPS)},
    }
    backend = make_backend(fake, tags, k8s_image_pull_secret="registry-credentials")
    for model in ("cpu", "rps", "plain"):
        backend.start_replica(model, "1", f"models:/{model}/1")
    sent = {body["kind"] for body in fake.bodies}
    assert sent == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    versions = newest_versions()
    assert len(versions) == 2
    for body in fake.bodies:
        for version in versions:
            kubernetes_validate.validate(body, version, strict=True)


def test_the_validator_refuses_a_broken_replica_object(fake) -> None:
    make_backend(fake).start_replica("m", "1", "models:/m/1")
    body = next(b for b in fake.bodies if b["kind"] == "Deployment")
    body["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, newest_versions()[-1], strict=True)


# -- adoption and stop_all ------------------------------------------------------------------


def test_a_restarted_controller_adopts_its_ready_replicas_by_label(fake) -> None:
    before = make_backend(fake, {"m": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_CPU)}})
    one = before.start_replica("m", "1", "models:/m/1")
    two = before.start_replica("Other Model", "7", "models:/Other Model/7")
    broken = before.start_replica("m", "2", "models:/m/2")
    fake.mark_failing(NS, broken.handle, Failing("CrashLoopBackOff"))
    # Orphans: a Service whose Deployment is gone (a controller died mid-stop).
    fake.delete("Deployment", NS, two.handle)

    after = make_backend(fake)  # a new process: nothing in memory
    adopted = after.adopt_running()
    assert adopted == [one]  # compared by model, version and URL
    assert adopted[0].handle == one.handle
    assert after.is_alive(adopted[0])
    # The crash-looping replica and the orphaned Service are gone.
    assert kinds(fake) == {
        "Deployment": [one.handle],
        "HorizontalPodAutoscaler": [one.handle],
        "PodDisruptionBudget": [one.handle],
        "Service": [one.handle],
    }
    after.stop_replica(adopted[0])
    assert fake.objects == {}


def test_stop_all_removes_only_this_instances_objects(fake) -> None:
    ours = make_backend(fake, {"m": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_CPU)}})
    theirs = make_backend(fake, home=Path("/elsewhere"))
    assert ours.instance != theirs.instance
    ours.start_replica("m", "1", "models:/m/1")
    ours.start_replica("m", "1", "models:/m/1")
    kept = theirs.start_replica("m", "1", "models:/m/1")
    # Someone else's Service in the same namespace, not flowline's.
    fake.create("Service", NS, {"metadata": {"name": "postgres", "labels": {"app": "pg"}}})

    ours.stop_all()
    assert kinds(fake) == {
        "Deployment": [kept.handle],
        "Service": sorted([kept.handle, "postgres"]),
    }
    assert theirs.is_alive(kept)
    assert ours.adopt_running() == [] and theirs.adopt_running() == [kept]


def test_an_unreachable_api_is_one_backend_error_on_adoption(fake) -> None:
    backend = make_backend(fake)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise api_error(503, "ServiceUnavailable", "the server is currently unable to handle")

    fake.list = down  # type: ignore[method-assign]
    with pytest.raises(BackendError, match=r"could not list replicas in namespace ml: .* 503"):
        backend.adopt_running()
    backend.stop_all()  # logged, not raised: shutdown goes on


def test_an_api_outage_does_not_make_a_replica_look_dead(fake) -> None:
    backend = make_backend(fake)
    replica = backend.start_replica("m", "1", "models:/m/1")
    fake.read = lambda *a, **k: (_ for _ in ()).throw(api_error(500, "InternalError", "etcd"))  # type: ignore[method-assign]
    assert backend.is_alive(replica)


# -- the shared fake itself (leases, selectors) ---------------------------------------------


def test_leases_conflict_on_a_stale_resource_version(fake) -> None:
    from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta

    leases = fake.apis().coordination
    body = V1Lease(metadata=V1ObjectMeta(name="leader"), spec=V1LeaseSpec(holder_identity="a"))
    created = leases.create_namespaced_lease(NS, body)
    with pytest.raises(Exception) as taken:
        leases.create_namespaced_lease(NS, body)
    assert taken.value.status == 409
    first, second = (leases.read_namespaced_lease("leader", NS) for _ in range(2))
    first.spec.holder_identity = "b"
    renewed = leases.replace_namespaced_lease("leader", NS, first)
    assert int(renewed.metadata.resource_version) > int(created.metadata.resource_version)
    second.spec.holder_identity = "c"
    with pytest.raises(Exception) as stale:
        leases.replace_namespaced_lease("leader", NS, second)
    assert stale.value.status == 409
    assert leases.read_namespaced_lease("leader", NS).spec.holder_identity == "b"
    with pytest.raises(Exception) as missing:
        leases.read_namespaced_lease("nobody", NS)
    assert missing.value.status == 404


def test_label_selectors_of_the_fake() -> None:
    labels = {"a": "1", "b": "2"}
    assert matches("a=1,b==2", labels) and matches("a!=3,!c,b", labels)
    assert matches("a in (1, 5),b notin (3)", labels)
    assert not matches("a=2", labels) and not matches("c", labels)
    assert not matches("a notin (1)", labels)


# -- image push ----------------------------------------------------------------------------


class StubDocker:
    """The Docker SDK calls a push makes: images.get(tag).tag(...) and images.push."""

    def __init__(self, stream: list[dict[str, Any]]) -> None:
        self.stream = stream
        self.tagged: list[tuple[str, str]] = []
        self.pushed: list[tuple[str, str]] = []
        self.images = self

    def get(self, tag: str) -> Any:
        return SimpleNamespace(tag=lambda repository, tag: self.tagged.append((repository, tag)))

    def push(self, repository: str, tag: str, stream: bool, decode: bool) -> Any:
        assert stream and decode
        self.pushed.append((repository, tag))
        return iter(self.stream)


def _built(model: str, version: str, model_uri: str) -> BuiltImage:
    return BuiltImage(f"flowline-model/{model}:v{version}-0123456789abcdef", "d" * 64, True, 1.0)


def test_an_image_is_built_once_tagged_under_the_registry_and_pushed_once() -> None:
    docker = StubDocker([{"status": "Pushed"}, {"status": "v1: digest: sha256:..."}])
    builds: list[str] = []

    def build(model: str, version: str, model_uri: str) -> BuiltImage:
        builds.append(version)
        return _built(model, version, model_uri)

    publisher = RegistryPublisher("http://t", HOME, "registry.test:5000/ml/", docker, build)
    remote = "registry.test:5000/ml/flowline-model/iris"
    assert publisher.reference("iris", "1", "models:/iris/1") == f"{remote}:v1-0123456789abcdef"
    publisher.reference("iris", "1", "models:/iris/1")
    assert builds == ["1"]
    assert docker.tagged == docker.pushed == [(remote, "v1-0123456789abcdef")]


def test_a_failed_push_is_the_daemons_reason_in_one_line() -> None:
    docker = StubDocker([{"status": "Preparing"}, {"errorDetail": {"message": "denied:\n no"}}])
    publisher = RegistryPublisher("http://t", HOME, "registry.test", docker, _built)
    with pytest.raises(
        BackendError, match="image push of registry.test/flowline-model/m:v1-.* failed: denied: no$"
    ):
        publisher.reference("m", "1", "models:/m/1")


def test_without_a_registry_the_local_tag_is_used_and_nothing_is_pushed() -> None:
    docker = StubDocker([])
    publisher = RegistryPublisher("http://t", HOME, "", docker, _built)
    assert publisher.reference("m", "1", "u") == "flowline-model/m:v1-0123456789abcdef"
    assert docker.pushed == []


# -- wiring: settings, configuration, factory, RBAC ------------------------------------------


def test_settings_come_from_the_environment() -> None:
    settings = KubernetesSettings.from_env(
        {
            "FLOWLINE_K8S_NAMESPACE": "models",
            "FLOWLINE_K8S_REGISTRY": "registry.test/ml",
            "FLOWLINE_K8S_SERVICE_PORT": "80",
            "FLOWLINE_K8S_READY_TIMEOUT_S": "120",
            "FLOWLINE_K8S_CONFIG": "in-cluster",
            "FLOWLINE_K8S_INSTANCE": "prod",
        }
    )
    assert (settings.k8s_namespace, settings.k8s_registry) == ("models", "registry.test/ml")
    assert (settings.k8s_service_port, settings.k8s_ready_timeout_s) == (80, 120.0)
    assert (settings.k8s_config, settings.k8s_instance) == ("in-cluster", "prod")
    for bad in ({"FLOWLINE_K8S_CONFIG": "magic"}, {"FLOWLINE_K8S_INSTANCE": "no spaces"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            KubernetesSettings.from_env(bad)


def test_the_service_port_setting_is_in_the_replica_url(fake) -> None:
    replica = make_backend(fake, k8s_service_port=80).start_replica("m", "1", "models:/m/1")
    assert replica.url.endswith(".ml.svc.cluster.local:80")
    assert fake.get("Service", NS, replica.handle)["spec"]["ports"][0]["port"] == 80


def test_a_kubeconfig_loads_without_contacting_the_cluster(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [
                    {"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team"}}
                ],
                "current-context": "x",
            }
        )
    )
    settings = KubernetesSettings(k8s_config="kubeconfig", k8s_kubeconfig=str(kubeconfig))
    apis, namespace = load_apis(settings)
    assert namespace == "team"  # the context's namespace, as kubectl uses it
    assert apis.apps.api_client.configuration.host == "https://127.0.0.1:1"
    missing = KubernetesSettings(k8s_config="kubeconfig", k8s_kubeconfig=str(tmp_path / "no"))
    with pytest.raises(BackendError, match=r"^no Kubernetes configuration \(kubeconfig\): "):
        load_apis(missing)
    with pytest.raises(BackendError, match=r"^no Kubernetes configuration \(in-cluster\): "):
        load_apis(KubernetesSettings(k8s_config="in-cluster"))


def test_the_factory_knows_kubernetes_and_imports_its_client_only_when_chosen(tmp_path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from serving.backends.factory import BACKENDS, create_backend\n"
        "from serving.backends.ports import PortPool\n"
        "import serving.backends.router\n"
        "assert 'kubernetes' in BACKENDS\n"
        f"home = Path({str(tmp_path)!r})\n"
        "create_backend('local', 'http://t', home, PortPool('127.0.0.1', 9900))\n"
        "assert not any(m == 'kubernetes' or m.startswith('kubernetes.') for m in sys.modules)\n"
        "from serving.backends.base import BackendError\n"
        "try:\n"
        "    create_backend('kubernetes', 'http://t', home, None)\n"
        "except BackendError as exc:\n"
        "    print(exc)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FLOWLINE_K8S_CONFIG": "kubeconfig",
        "FLOWLINE_K8S_KUBECONFIG": str(tmp_path / "none"),
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("no Kubernetes configuration (kubeconfig): ")


# What each recorded call needs from RBAC: (API group, resource).
RESOURCES = {
    "Deployment": ("apps", "deployments"),
    "Service": ("", "services"),
    "Pod": ("", "pods"),
    "Pod/log": ("", "pods/log"),
    "HorizontalPodAutoscaler": ("autoscaling", "horizontalpodautoscalers"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
    "Lease": ("coordination.k8s.io", "leases"),
}


def test_the_controllers_role_grants_every_call_the_backend_makes(fake) -> None:
    backend = make_backend(fake, {"m": {objects.KUBERNETES_MODEL_TAG: json.dumps(HPA_CPU)}})
    replica = backend.start_replica("m", "1", "models:/m/1")
    fake.kubelet = lambda deployment: Failing("CrashLoopBackOff", log="boom")
    with pytest.raises(BackendError):
        backend.start_replica("m", "2", "models:/m/2")  # reads the crashed pod's log
    fake.kubelet = lambda deployment: READY
    backend.is_alive(replica)
    backend.adopt_running()
    backend.stop_replica(replica)
    backend.stop_all()
    controller = manifests.resources(manifests.RenderOptions())["controller.yaml"]
    role = next(d for d in controller if d["kind"] == "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {(*RESOURCES[kind], verb) for verb, kind, _ in fake.calls}
    assert ("", "pods/log", "get") in needed
    assert needed <= granted, needed - granted


# -- the real Reconciler over the backend and the fake ---------------------------------------


@pytest.fixture
def rollout(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The real Reconciler on a KubernetesBackend over the fake, with the stub registry
    and gateway of tests/test_reconciler.py; one event list orders all of them."""
    events: list[tuple[Any, ...]] = []
    fake = FakeCluster(events)
    registry, gateway = StubRegistry(events), StubGateway(events)

    def tags_of(model: str) -> dict[str, str]:
        return registry.models[model].tags

    backend = KubernetesBackend(
        "http://tracking.test",
        HOME,
        settings=KubernetesSettings(k8s_namespace=NS, k8s_ready_timeout_s=2.0),
        apis=fake.apis(),
        images=StubImages(),
        tags_of=tags_of,
        poll_interval=0.01,
    )

    def post(url: str, json: dict[str, Any], timeout: float) -> requests.Response:
        """The smoke test, answered only through a Service that selects ready pods."""
        host = url.split("//", 1)[1].split("/", 1)[0]
        name, namespace = host.split(".")[:2]
        events.append(("smoke", name))
        response = requests.Response()
        svc = fake.get("Service", namespace, name)
        ready = [
            p
            for p in fake.of_kind("Pod", namespace)
            if svc
            and all(p["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
            and p["status"]["phase"] == "Running"
        ]
        if not ready:
            raise requests.ConnectionError(f"no endpoints for {host}")
        response.status_code = 200
        response._content = _encoded({"predictions": [0] * len(json["dataframe_split"]["data"])})
        return response

    monkeypatch.setattr(
        reconciler_module.mlflow.artifacts, "download_artifacts", registry.download_artifacts
    )
    fake_requests = SimpleNamespace(post=post, RequestException=requests.RequestException)
    monkeypatch.setattr(reconciler_module, "requests", fake_requests)
    reconciler = Reconciler(registry, backend, gateway, replicas=1, drain_timeout=1.0)
    return SimpleNamespace(
        events=events,
        fake=fake,
        registry=registry,
        gateway=gateway,
        backend=backend,
        reconciler=reconciler,
    )


def _encoded(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _index(events: list[tuple[Any, ...]], wanted: tuple[Any, ...]) -> int:
    return next(i for i, e in enumerate(events) if e[: len(wanted)] == wanted)


def test_the_reconciler_rolls_out_blue_green_over_kubernetes(rollout) -> None:
    world = rollout
    world.registry.add_version("m", "1")
    world.registry.promote("m", "1")
    world.reconciler.reconcile()
    (old,) = world.gateway.table["m"].replicas
    old_name = old.split("//")[1].split(".")[0]
    assert old == f"http://{old_name}.{NS}.svc.cluster.local:8080"
    assert world.registry.tags("m", "1")[STATUS_TAG] == "deployed"

    world.events.clear()
    world.registry.add_version("m", "2")
    world.registry.promote("m", "2")
    world.reconciler.reconcile()
    (new,) = world.gateway.table["m"].replicas
    new_name = new.split("//")[1].split(".")[0]
    assert new != old and world.gateway.table["m"].version == "2"
    events = world.events
    order = [
        _index(events, ("k8s", "create", "Deployment", new_name)),
        _index(events, ("k8s", "create", "Service", new_name)),
        _index(events, ("smoke", new_name)),  # through the new Service
        _index(events, ("put", "m", "2", (new,))),  # the switch
        _index(events, ("drain", (old,))),
        _index(events, ("k8s", "patch", "Deployment", old_name)),  # scale to zero
        _index(events, ("k8s", "delete", "Deployment", old_name)),
    ]
    assert order == sorted(order)
    assert kinds(world.fake) == {"Deployment": [new_name], "Service": [new_name]}
    assert world.registry.tags("m", "1")[STATUS_TAG] == "undeployed"


def test_a_version_whose_image_cannot_be_pulled_fails_and_the_old_one_keeps_serving(
    rollout,
) -> None:
    world = rollout
    world.registry.add_version("m", "1")
    world.registry.promote("m", "1")
    world.reconciler.reconcile()
    (old,) = world.gateway.table["m"].replicas
    before = kinds(world.fake)

    def kubelet(deployment: dict[str, Any]) -> Any:
        image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        return Failing("ErrImagePull", "manifest unknown") if ":v2-" in image else READY

    world.fake.kubelet = kubelet
    world.registry.add_version("m", "2")
    world.registry.promote("m", "2")
    world.reconciler.reconcile()
    tags = world.registry.tags("m", "2")
    assert tags[STATUS_TAG] == "failed"
    assert tags["flowline.deployment.reason"] == (
        "replica of m/2 failed: ErrImagePull: manifest unknown"
    )
    assert world.gateway.table["m"].replicas == (old,)
    assert kinds(world.fake) == before  # nothing of version 2 is left


def test_a_restarted_controller_adopts_and_its_first_pass_changes_nothing(rollout) -> None:
    world = rollout
    world.registry.add_version("m", "1")
    world.registry.promote("m", "1")
    world.reconciler.reconcile()
    routed = world.gateway.table["m"].replicas

    backend = make_backend(world.fake, {})
    backend._tags_of = lambda model: world.registry.models[model].tags
    restarted = Reconciler(world.registry, backend, world.gateway, replicas=1, drain_timeout=1.0)
    restarted.adopt(backend.adopt_running())
    world.events.clear()
    restarted.reconcile()
    assert [
        e for e in world.events if e[0] in ("put", "drain") or e[1:2] in (("create",), ("delete",))
    ] == []
    assert restarted.deployed["m"].version == "1"
    assert tuple(r.url for r in restarted.deployed["m"].replicas) == routed


def test_the_reconciler_replaces_a_replica_whose_pods_crash(rollout) -> None:
    world = rollout
    world.registry.add_version("m", "1")
    world.registry.promote("m", "1")
    world.reconciler.reconcile()
    (dead,) = world.gateway.table["m"].replicas
    dead_name = dead.split("//")[1].split(".")[0]
    world.fake.mark_failing(NS, dead_name, Failing("CrashLoopBackOff"))
    world.reconciler.reconcile()
    (fresh,) = world.gateway.table["m"].replicas
    assert fresh != dead
    assert [n for n in kinds(world.fake)["Deployment"]] == [fresh.split("//")[1].split(".")[0]]
