"""Read a saved model's signature and serving input example for a `Deployment`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from serving.gateway.routes import BatchingSettings, Deployment

SERVING_EXAMPLE_FILE = "serving_input_example.json"


def read_model_metadata(model_dir: str | Path) -> dict[str, Any]:
    """{"signature": MLmodel's signature dict or None, "input_example": request body or None}."""
    model_dir = Path(model_dir)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    example_info = mlmodel.get("saved_input_example_info") or {}
    example_path = model_dir / example_info.get("serving_input_path", SERVING_EXAMPLE_FILE)
    example = json.loads(example_path.read_text()) if example_path.is_file() else None
    return {"signature": mlmodel.get("signature"), "input_example": example}


def deployment_from_model_dir(
    model: str,
    version: str,
    replicas: list[str],
    model_dir: str | Path,
    batching: BatchingSettings | None = None,
) -> Deployment:
    """A `Deployment` whose signature and input example come from a local model directory."""
    meta = read_model_metadata(model_dir)
    return Deployment(
        model=model,
        version=version,
        replicas=tuple(replicas),
        input_example=meta["input_example"],
        signature=meta["signature"],
        batching=batching or BatchingSettings(),
    )
