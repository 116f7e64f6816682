"""A model version's files, downloaded by the controller so that replicas need no
registry credentials."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from serving.backends.base import BackendError


def download_version(model_uri: str, target: Path, tracking_uri: str) -> Path:
    """Download ``model_uri`` into ``target`` whole or not at all; a no-op when there.

    The copy lands in a staging folder beside ``target`` and is renamed into place, so a
    crash mid-download never leaves a half model that a replica would load.
    """
    if (target / "MLmodel").exists():
        return target
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=str(staging), tracking_uri=tracking_uri
        )
        if not (Path(local) / "MLmodel").exists():
            # MLflow answers an empty folder when the artifacts are gone from the store.
            raise BackendError(f"{model_uri} has no MLmodel in the artifact store")
        os.replace(local, target)
    except (MlflowException, OSError) as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise BackendError(f"could not download {model_uri}: {first}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
