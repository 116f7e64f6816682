"""`flowline k8s render`: every manifest validates against the Kubernetes OpenAPI schemas
(offline, kubernetes-validate, strict, the two newest minor versions it ships), and the
base has what production needs: a NetworkPolicy per role, secrets only in the Secret,
probes and a restricted securityContext on every container, private files.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from flowline import k8s
from tests.conftest import BIN

ROLES = ("tracking", "controller", "gateway", "monitor")


def newest_versions(count: int = 2) -> list[str]:
    """The newest Kubernetes versions whose schemas kubernetes-validate ships."""
    folder = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = {p.name.split("-")[0].lstrip("v") for p in folder.iterdir() if p.name[0] == "v"}
    versions = sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))
    return versions[-count:]


def load(folder: Path) -> list[dict[str, Any]]:
    """Every document of every file in a rendered base."""
    return [
        doc
        for path in sorted(folder.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
    ]


@pytest.fixture(params=["pvc", "s3://flowline-artifacts/mlflow"], ids=["pvc", "s3"])
def rendered(request: pytest.FixtureRequest, tmp_path: Path) -> list[dict[str, Any]]:
    """The base rendered by the real command line."""
    out = tmp_path / "base"
    result = subprocess.run(
        [str(BIN / "flowline"), "k8s", "render", "--out", str(out), "--artifacts", request.param],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in out.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    return [d for d in load(out) if d["kind"] != "Kustomization"]


def test_every_manifest_validates_for_the_two_newest_kubernetes_versions(rendered) -> None:
    versions = newest_versions()
    assert len(versions) == 2
    for doc in rendered:
        for version in versions:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_a_broken_manifest(rendered) -> None:
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"] = {
        "path": "/ping"  # no port
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, newest_versions()[-1], strict=True)


def test_a_network_policy_for_each_role_and_a_default_deny(rendered) -> None:
    policies = [d for d in rendered if d["kind"] == "NetworkPolicy"]
    selected = {
        p["spec"]["podSelector"].get("matchLabels", {}).get(k8s.ROLE_LABEL) for p in policies
    }
    assert set(ROLES) | {"replica", None} <= selected
    deny = next(p for p in policies if p["spec"]["podSelector"] == {})
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    replica = next(
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels") == {k8s.ROLE_LABEL: "replica"}
    )
    sources = [
        s["podSelector"]["matchLabels"][k8s.ROLE_LABEL]
        for s in replica["spec"]["ingress"][0]["from"]
    ]
    assert sorted(sources) == ["controller", "gateway"]


def test_every_role_runs_with_probes_limits_and_a_restricted_security_context(rendered) -> None:
    deployments = {
        d["metadata"]["labels"][k8s.ROLE_LABEL]: d for d in rendered if d["kind"] == "Deployment"
    }
    assert set(deployments) == set(ROLES)
    for role, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            assert container["readinessProbe"]["httpGet"]["port"] == k8s.PORTS[role]
            assert container["livenessProbe"]["httpGet"]["path"]
            assert container["resources"]["limits"] and container["resources"]["requests"]
            security = container["securityContext"]
            assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
            assert not security["allowPrivilegeEscalation"]
            assert security["capabilities"]["drop"] == ["ALL"]
        # Only the controller talks to the Kubernetes API.
        assert pod["automountServiceAccountToken"] is (role == "controller")
    # Several of each: gateways and controllers find each other by pod IP, the controllers
    # elect a leader with a Lease and run replicas through the Kubernetes backend.
    assert deployments["gateway"]["spec"]["replicas"] == 2
    assert deployments["controller"]["spec"]["replicas"] == 2
    for role in ("gateway", "controller"):
        env = {
            e["name"]: e
            for e in deployments[role]["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["FLOWLINE_ADVERTISE_URL"]["value"] == f"http://$(POD_IP):{k8s.PORTS[role]}"
        assert (
            env["FLOWLINE_COORDINATION_URL"]["valueFrom"]["secretKeyRef"]["key"] == "database-url"
        )
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    assert config["FLOWLINE_LEADER_ELECTION"] == "kubernetes"
    assert config["FLOWLINE_BACKEND"] == "kubernetes"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in rendered}
    assert ("HorizontalPodAutoscaler", "flowline-gateway") in kinds
    assert ("PodDisruptionBudget", "flowline-gateway") in kinds
    assert {("ServiceAccount", "flowline-controller"), ("Role", "flowline-controller")} <= kinds


def test_secrets_are_only_in_the_secret_and_the_role_is_namespaced_least_privilege(rendered):
    secret = next(d for d in rendered if d["kind"] == "Secret")
    tokens = {k: v for k, v in secret["stringData"].items() if k.endswith(("token", "secret"))}
    assert len(tokens) == 4 and all(len(v) >= 40 for v in tokens.values())
    config = next(d for d in rendered if d["kind"] == "ConfigMap")
    text = yaml.safe_dump(config) + "".join(
        yaml.safe_dump(d) for d in rendered if d["kind"] != "Secret"
    )
    for value in secret["stringData"].values():
        if value != "CHANGE-ME":
            assert value not in text
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in rendered)
    role = next(d for d in rendered if d["kind"] == "Role")
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in role["rules"])
    assert not any("secrets" in rule["resources"] for rule in role["rules"])


def test_a_bad_option_is_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "flowline"),
            "k8s",
            "render",
            "--out",
            str(tmp_path / "x"),
            "--artifacts",
            "ftp://x",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("flowline: error: artifacts must be")
    assert "Traceback" not in result.stderr
