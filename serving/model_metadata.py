"""Read a saved model's signature and serving input example for a `Deployment`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from common.registry import INPUT_TYPES_METADATA
from serving.deployment import BatchingSettings, Deployment

SERVING_EXAMPLE_FILE = "serving_input_example.json"


TYPE_ANNOTATION = "x-flowline-type"


def read_model_metadata(model_dir: str | Path) -> dict[str, Any]:
    """{"signature": MLmodel's signature dict or None, "input_example": request body or None}.

    Input columns the signature declares ``any`` carry the exact type from the model's
    ``flowline.input_types`` metadata under ``x-flowline-type``, for the OpenAPI page.
    """
    model_dir = Path(model_dir)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    example_info = mlmodel.get("saved_input_example_info") or {}
    example_path = model_dir / example_info.get("serving_input_path", SERVING_EXAMPLE_FILE)
    # MLflow writes NaN for a missing value in the example; the example is sent as a JSON
    # body (admin API, /openapi.json, the smoke test), and strict JSON spells it null.
    example = (
        json.loads(example_path.read_text(), parse_constant=lambda _: None)
        if example_path.is_file()
        else None
    )
    types = (mlmodel.get("metadata") or {}).get(INPUT_TYPES_METADATA)
    return {"signature": _annotated(mlmodel.get("signature"), types), "input_example": example}


def _annotated(signature: dict[str, Any] | None, types: Any) -> dict[str, Any] | None:
    if not signature or not isinstance(types, dict) or not signature.get("inputs"):
        return signature
    inputs = signature["inputs"]
    specs = json.loads(inputs) if isinstance(inputs, str) else inputs
    for spec in specs:
        if spec.get("type") == "any" and isinstance(types.get(spec.get("name")), str):
            spec[TYPE_ANNOTATION] = types[spec["name"]]
    return {**signature, "inputs": json.dumps(specs)}


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
