"""The MLflow tracking server with flowline's embedded defaults and webhook settings."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet

from common.db import sqlalchemy_url
from common.processes import PRIVATE_UMASK, ManagedProcess, venv_bin, venv_first_path
from common.secrets import persistent_secret
from flowline.auth import Auth

HEALTH_TIMEOUT_SECONDS = 120.0


def webhook_encryption_key(home: Path) -> str:
    """The Fernet key that lets the server decrypt webhook secrets across restarts.

    It is created once and kept in the home folder, because a new key on every start
    would make every stored webhook secret unreadable.
    """
    return persistent_secret(
        home / "webhook-encryption.key", lambda: Fernet.generate_key().decode()
    )


@dataclass(frozen=True)
class TrackingServer:
    """How to run ``mlflow server``: SQLite plus local artifacts under ``home`` by default."""

    home: Path
    host: str = "127.0.0.1"
    port: int = 5000
    backend_store_uri: str = ""
    artifacts_destination: str = ""
    workers: int = 2
    # MLflow's basic-auth app (flowline/auth.py): every call needs a user and password.
    auth: bool = False

    @property
    def url(self) -> str:
        """The server's base URL, also the MLFLOW_TRACKING_URI for clients."""
        return f"http://{self.host}:{self.port}"

    def backend_uri(self) -> str:
        """The SQL backend: the given URI, else a SQLite file in the home folder.

        A bare ``postgresql://`` URI is pointed at psycopg 3, the driver flowline
        installs; SQLAlchemy would otherwise look for psycopg2.
        """
        return sqlalchemy_url(self.backend_store_uri or f"sqlite:///{self.home / 'mlflow.db'}")

    def artifacts_root(self) -> str:
        """Where the server stores artifacts it proxies."""
        return self.artifacts_destination or str(self.home / "artifacts")

    def argv(self) -> list[str]:
        """The ``mlflow server`` command line."""
        mlflow_bin = shutil.which("mlflow", path=venv_bin()) or "mlflow"
        return [
            mlflow_bin,
            "server",
            "--backend-store-uri",
            self.backend_uri(),
            "--artifacts-destination",
            self.artifacts_root(),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            *(["--app-name", "basic-auth"] if self.auth else []),
        ]

    def environment(self) -> dict[str, str]:
        """The process environment, with what loopback registry webhooks need."""
        env = dict(os.environ)
        env.update(
            {
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": webhook_encryption_key(self.home),
                # The server caches the webhook list (60 s by default): a controller's new
                # webhook should take effect within seconds, not a minute.
                "MLFLOW_WEBHOOK_CACHE_TTL": os.environ.get("MLFLOW_WEBHOOK_CACHE_TTL", "5"),
                # The venv's bin first, so the server's helpers are this install's.
                "PATH": venv_first_path(env.get("PATH", "")),
            }
        )
        if self.auth:
            env.update(Auth(self.home).server_env())
        return env

    def process(self, log_path: Path | None = None) -> ManagedProcess:
        """An unstarted managed process for this server."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.artifacts_destination:
            Path(self.artifacts_root()).mkdir(mode=0o700, parents=True, exist_ok=True)
        return ManagedProcess(
            self.argv(),
            env=self.environment(),
            log_path=log_path or self.home / "logs" / "tracking.log",
            umask=PRIVATE_UMASK,  # mlflow.db and the artifacts it stores: 0600 in 0700
        )

    def start(self, timeout: float = HEALTH_TIMEOUT_SECONDS) -> ManagedProcess:
        """Start the server and wait until ``/health`` answers."""
        process = self.process().start()
        try:
            process.wait_healthy(f"{self.url}/health", timeout)
        except BaseException:
            process.stop()
            raise
        return process
