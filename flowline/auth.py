"""`--auth`: MLflow's basic-auth app on the tracking server, with flowline's credentials.

The registry decides what is served, so with ``--auth`` nobody changes it without a
password, and MLflow's registered-model permissions decide who may promote (a READ
user cannot set ``production``). Everything lives in ``FLOWLINE_HOME``, 0600:

- ``auth-admin-password``: the ``admin`` user's password, generated once and printed
  once by `flowline up/server`; MLflow creates the user from it on first start;
- ``auth-service-password``: the ``flowline-service`` user (an MLflow admin) that the
  controller, gateway and monitor use; replicas never get it (their environment is an
  allowlist, serving/backends/local.py);
- ``auth-flask-secret``, ``basic_auth.ini`` and ``basic_auth.db``: the app's own state.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import requests

from common.secrets import created_secret, persistent_secret

ADMIN_USER = "admin"
SERVICE_USER = "flowline-service"


def _password() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Auth:
    """flowline's basic-auth settings under one home."""

    home: Path

    def admin_password(self) -> tuple[str, bool]:
        """The admin password, and whether it was generated just now (print it once)."""
        return created_secret(self.home / "auth-admin-password", _password)

    def service_env(self) -> dict[str, str]:
        """What flowline's own services need to call the registry as ``flowline-service``."""
        password, _ = created_secret(self.home / "auth-service-password", _password)
        return {"MLFLOW_TRACKING_USERNAME": SERVICE_USER, "MLFLOW_TRACKING_PASSWORD": password}

    def server_env(self) -> dict[str, str]:
        """The tracking server's settings for ``--app-name basic-auth``."""
        config = self.home / "basic_auth.ini"
        text = (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.home / 'basic_auth.db'}\n"
            f"admin_username = {ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password()[0],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": persistent_secret(
                self.home / "auth-flask-secret", _password
            ),
        }

    def ensure_service_user(self, tracking_url: str) -> None:
        """Create ``flowline-service`` as an MLflow admin if it is missing (idempotent)."""
        admin = (ADMIN_USER, self.admin_password()[0])
        password = self.service_env()["MLFLOW_TRACKING_PASSWORD"]
        api = f"{tracking_url}/api/2.0/mlflow/users"

        def call(method: str, path: str, what: str, **kwargs: object) -> requests.Response:
            response = requests.request(method, f"{api}/{path}", auth=admin, timeout=10, **kwargs)
            if what and response.status_code != 200:
                raise RuntimeError(
                    f"could not {what}: HTTP {response.status_code} {response.text[:200]} "
                    "(was the admin password in FLOWLINE_HOME/auth-admin-password changed?)"
                )
            return response

        user = {"username": SERVICE_USER, "password": password}
        if call("GET", "get", "", params={"username": SERVICE_USER}).status_code == 200:
            # The password file is the truth: keep the user in step with it.
            call("PATCH", "update-password", "set the flowline-service password", json=user)
        else:
            call("POST", "create", "create the flowline-service user", json=user)
        # Admin: it tags versions, registers the webhook and logs monitoring runs anywhere.
        call(
            "PATCH",
            "update-admin",
            "make flowline-service an admin",
            json={"username": SERVICE_USER, "is_admin": True},
        )


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach."""
    return host in LOOPBACK or host.startswith("127.")
