"""Is a replica's Deployment ready, still coming up, or failed? Read from its status.

Pure: `rollout_state` reads a Deployment and its pods as the API returned them. A
rollout is ready once the Deployment's controller has seen its latest spec and every
wanted pod is ready and available. It has failed, with no point in waiting longer,
when a pod cannot pull its image, cannot create its container, or crash-loops, or when
the Deployment itself reports ``ReplicaFailure`` (a quota, an admission webhook) or an
exceeded progress deadline. Anything else (unschedulable for now, the container
creating, the readiness probe not passing yet) is worth waiting for, until the
controller's deadline; its reason goes into the timeout message.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes import client

# Waiting reasons the kubelet does not recover from without a change to the pod spec or
# the registry; ErrImagePull included: it is retried, but a missing or forbidden image
# does not appear by itself within a rollout's deadline.
FATAL_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "CrashLoopBackOff",
    }
)


@dataclass(frozen=True)
class Rollout:
    """One look at a rollout: ready, failed (``failure``), or waiting (``waiting``)."""

    ready: bool
    failure: str | None = None
    waiting: str | None = None


def _one_line(text: str | None, limit: int = 300) -> str:
    return " ".join((text or "").split())[:limit]


def _crash(status: client.V1ContainerStatus) -> str | None:
    """Why a container's last run ended, when it ended badly."""
    last = status.last_state.terminated if status.last_state else None
    now = status.state.terminated if status.state else None
    ended = now or last
    if ended is None:
        return None
    if ended.reason == "OOMKilled":
        return "killed for memory (raise flowline.resources)"
    return f"exited {ended.exit_code} ({ended.reason or 'Error'})"


def pod_failure(pod: client.V1Pod) -> tuple[str, str] | None:
    """(container, one-line reason) when a container of ``pod`` cannot come up."""
    statuses = (pod.status.container_statuses or []) if pod.status else []
    for status in statuses:
        waiting = status.state.waiting if status.state else None
        if waiting is None or waiting.reason not in FATAL_WAITING:
            continue
        reason = waiting.reason
        if reason == "CrashLoopBackOff":
            return status.name, f"{reason}: {_crash(status) or 'the container keeps exiting'}"
        return status.name, f"{reason}: {_one_line(waiting.message) or 'no message'}"
    return None


def _pod_waiting(pod: client.V1Pod) -> str | None:
    conditions = (pod.status.conditions or []) if pod.status else []
    for condition in conditions:
        if condition.type == "PodScheduled" and condition.status == "False":
            return f"unschedulable: {_one_line(condition.message) or condition.reason}"
    statuses = (pod.status.container_statuses or []) if pod.status else []
    for status in statuses:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason:
            return f"{waiting.reason}: {_one_line(waiting.message)}".rstrip(": ")
        if status.state and status.state.running and not status.ready:
            return "running, /ping not answering yet"
    phase = pod.status.phase if pod.status else None
    return f"pod {phase or 'pending'}"


def rollout_state(deployment: client.V1Deployment, pods: list[client.V1Pod]) -> Rollout:
    """Where the Deployment's rollout stands, from its status and its pods'."""
    status = deployment.status or client.V1DeploymentStatus()
    wanted = deployment.spec.replicas if deployment.spec.replicas is not None else 1
    for condition in status.conditions or []:
        if condition.type == "ReplicaFailure" and condition.status == "True":
            return Rollout(False, failure=f"{condition.reason}: {_one_line(condition.message)}")
        if condition.type == "Progressing" and condition.status == "False":
            return Rollout(False, failure=f"{condition.reason}: {_one_line(condition.message)}")
    for pod in pods:
        failed = pod_failure(pod)
        if failed is not None:
            return Rollout(False, failure=failed[1])
    seen = (status.observed_generation or 0) >= (deployment.metadata.generation or 0)
    ready = (status.ready_replicas or 0) >= wanted and (status.available_replicas or 0) >= wanted
    if seen and ready and wanted > 0:
        return Rollout(True)
    reasons = [r for r in (_pod_waiting(p) for p in pods) if r]
    why = reasons[0] if reasons else "no pod created yet"
    return Rollout(False, waiting=f"{status.ready_replicas or 0}/{wanted} ready, {why}")
