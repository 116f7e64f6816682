"""The ``flowline`` target of ``mlflow deployments``.

flowline's desired state is the registry, so this target does not keep deployments of
its own: ``create``/``update`` set the alias ``production`` on the version named by
``-m models:/NAME/VERSION`` (the deployment name is the registered model's name) and
wait until the controller serves it; ``delete`` removes the alias. ``list``, ``get``
and ``predict`` talk to the gateway. Settings come from the environment:
``MLFLOW_TRACKING_URI``, ``FLOWLINE_GATEWAY_URL`` (default http://127.0.0.1:8080).

``--config`` on create/update sets the registered model's flowline tags before the
promotion: ``backend=local|docker`` (where its replicas run), ``replicas=N``, and
``cpus=1.5`` / ``memory=2g`` (a container's limits).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import mlflow
import pandas as pd
import requests
from mlflow import MlflowClient
from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from common.processes import replica_environment
from common.registry import (
    BACKEND_MODEL_TAG,
    PRODUCTION_ALIAS,
    REASON_TAG,
    REPLICAS_MODEL_TAG,
    RESOURCES_MODEL_TAG,
    STATUS_TAG,
)
from common.settings import FlowlineBaseSettings
from serving.backends.base import BackendError
from serving.backends.docker import Resources
from serving.backends.factory import BACKENDS
from serving.served import served_models, wait_until_served

# What `mlflow deployments create/update --config KEY=VALUE` may set.
CONFIG_KEYS = {"backend", "replicas", "cpus", "memory"}

WAIT_SECONDS = 180.0


def target_help() -> str:
    """Help text for ``mlflow deployments help -t flowline``."""
    return __doc__ or ""


def run_local(
    target: str, name: str, model_uri: str, flavor: str | None = None, config: dict | None = None
) -> None:
    """Serve ``model_uri`` in the foreground with the stock scorer, as one flowline replica runs."""
    port = str((config or {}).get("port", 5001))
    bin_dir = os.path.dirname(sys.executable)
    # The environment a flowline replica gets: no platform secret reaches model code.
    env = replica_environment(mlflow.get_tracking_uri())
    serve = ["models", "serve", "-m", model_uri, "-p", port, "--env-manager", "local"]
    subprocess.run([os.path.join(bin_dir, "mlflow"), *serve], env=env, check=True)


def _parse_model_uri(name: str, model_uri: str, client: MlflowClient) -> str:
    """The version that ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names."""
    if not model_uri.startswith("models:/"):
        raise MlflowException(
            "the flowline target deploys registry versions: use -m models:/NAME/VERSION",
            INVALID_PARAMETER_VALUE,
        )
    ref = model_uri[len("models:/") :].strip("/")
    model, sep, alias = ref.partition("@")
    version = client.get_model_version_by_alias(model, alias).version if sep else None
    if not sep:
        model, _, version = ref.partition("/")
    if model != name:
        raise MlflowException(
            f"deployment name must be the registered model's name ({model!r})",
            INVALID_PARAMETER_VALUE,
        )
    if not version or not version.isdigit():
        raise MlflowException(f"no version in {model_uri!r}", INVALID_PARAMETER_VALUE)
    return version


def model_tags_from_config(config: dict[str, Any]) -> dict[str, str]:
    """The registered-model tags that ``--config`` asks for; a 400-style error naming the
    allowed keys for anything else, before anything is changed."""
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise MlflowException(
            f"unknown --config key(s) {', '.join(unknown)}: use {', '.join(sorted(CONFIG_KEYS))}",
            INVALID_PARAMETER_VALUE,
        )
    tags: dict[str, str] = {}
    if "backend" in config:
        if config["backend"] not in BACKENDS:
            raise MlflowException(
                f"backend must be one of {', '.join(BACKENDS)}", INVALID_PARAMETER_VALUE
            )
        tags[BACKEND_MODEL_TAG] = str(config["backend"])
    if "replicas" in config:
        if not str(config["replicas"]).isdigit() or int(config["replicas"]) < 1:
            raise MlflowException("replicas must be a whole number >= 1", INVALID_PARAMETER_VALUE)
        tags[REPLICAS_MODEL_TAG] = str(int(config["replicas"]))
    resources = {k: config[k] for k in ("cpus", "memory") if k in config}
    if resources:
        try:
            Resources.parse(json.dumps(resources), 1.0, "2g")
        except BackendError as exc:
            raise MlflowException(str(exc), INVALID_PARAMETER_VALUE) from None
        tags[RESOURCES_MODEL_TAG] = json.dumps(resources)
    return tags


class DeploymentError(MlflowException, click.ClickException):
    """An MlflowException that the ``mlflow deployments`` command prints as one line.

    The command (click) shows a ClickException as ``Error: <message>`` and exits 1, and
    prints a traceback for anything else; code that calls the target through
    ``get_deploy_client`` still catches it as the MlflowException it is.
    """

    def __init__(self, message: str, error_code: int = INTERNAL_ERROR) -> None:
        """``message`` on one line (answers quoted from a server may hold newlines)."""
        super().__init__(" ".join(str(message).split()), error_code)


Method = TypeVar("Method", bound=Callable[..., Any])


def one_line_errors(method: Method) -> Method:
    """Turn MLflow's and HTTP errors of a target method into a `DeploymentError`."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except DeploymentError:
            raise
        except MlflowException as exc:
            raise DeploymentError(exc.message, ErrorCode.Value(exc.error_code)) from None
        except requests.RequestException as exc:
            raise DeploymentError(f"flowline gateway request failed: {exc}") from None

    return wrapper  # type: ignore[return-value]


class TargetSettings(FlowlineBaseSettings):
    """FLOWLINE_GATEWAY_URL: the gateway the target scores through and watches."""

    gateway_url: str = "http://127.0.0.1:8080"


class FlowlineDeploymentClient(BaseDeploymentClient):
    """Deployments are promotions: the registry alias ``production`` is the desired state."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        self.client = MlflowClient()
        self.gateway = TargetSettings.from_env().gateway_url.rstrip("/")

    def _served(self) -> dict[str, dict[str, Any]]:
        try:
            return served_models(self.gateway, timeout=10)
        except (requests.RequestException, ValueError, KeyError) as exc:
            raise MlflowException(
                f"flowline gateway not reachable at {self.gateway}: {exc}"
            ) from None

    def _raise_if_failed(self, name: str, version: str) -> None:
        # The controller does not retry a failed version: waiting on would only time out.
        tags = self.client.get_model_version(name, version).tags
        if tags.get(STATUS_TAG) == "failed":
            raise MlflowException(f"deployment of {name}/{version} failed: {tags.get(REASON_TAG)}")

    def _wait(self, name: str, version: str | None) -> dict[str, Any] | None:
        # An unreachable gateway ends the wait at once (no retry_on): the user gets the
        # reason instead of a timeout three minutes later.
        check = (lambda: self._raise_if_failed(name, version)) if version is not None else None
        try:
            served = wait_until_served(
                self._served, name, version, WAIT_SECONDS, interval=0.5, check=check
            )
        except TimeoutError as exc:
            raise MlflowException(str(exc)) from None
        return served

    @one_line_errors
    def create_deployment(self, name, model_uri, flavor=None, config=None, endpoint=None):
        """Promote the version (alias ``production``) and wait until it serves.

        ``--config`` keys become the registered model's flowline tags first: ``backend``
        (local or docker), ``replicas``, and ``cpus``/``memory`` for containers.
        """
        version = _parse_model_uri(name, model_uri, self.client)
        for tag, value in model_tags_from_config(config or {}).items():
            self.client.set_registered_model_tag(name, tag, value)
        self.client.set_registered_model_alias(name, PRODUCTION_ALIAS, version)
        served = self._wait(name, version) or {}
        return {"name": name, "flavor": "python_function", **served}

    @one_line_errors
    def update_deployment(self, name, model_uri=None, flavor=None, config=None, endpoint=None):
        """Move the alias to another version; blue/green as for any promotion."""
        if model_uri is None:
            raise MlflowException("update needs -m models:/NAME/VERSION", INVALID_PARAMETER_VALUE)
        return self.create_deployment(name, model_uri, flavor, config, endpoint)

    @one_line_errors
    def delete_deployment(self, name, config=None, endpoint=None):
        """Remove the alias ``production`` and wait until the model is no longer served."""
        try:
            self.client.delete_registered_model_alias(name, PRODUCTION_ALIAS)
        except MlflowException as exc:
            raise MlflowException(f"{name} is not deployed by alias: {exc.message}") from None
        self._wait(name, None)

    @one_line_errors
    def list_deployments(self, endpoint=None):
        """Every model the gateway serves, as GET /models describes it."""
        return list(self._served().values())

    @one_line_errors
    def get_deployment(self, name, endpoint=None):
        """One served model's description."""
        served = self._served().get(name)
        if served is None:
            raise MlflowException(f"no deployment named {name!r}", RESOURCE_DOES_NOT_EXIST)
        return served

    @one_line_errors
    def predict(self, deployment_name=None, inputs=None, endpoint=None):
        """Score through the gateway, in MLflow's /invocations wire format."""
        if isinstance(inputs, pd.DataFrame):
            body = {"dataframe_split": inputs.to_dict(orient="split", index=False)}
        elif isinstance(inputs, dict):
            body = inputs
        else:
            body = {"inputs": inputs}
        response = requests.post(
            f"{self.gateway}/models/{deployment_name}/invocations", json=body, timeout=60
        )
        if response.status_code != 200:
            raise MlflowException(
                f"prediction failed ({response.status_code}): {response.text[:500]}"
            )
        return PredictionsResponse.from_json(response.text)
