"""Read a saved model's signature and serving input example for a `Deployment`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.models import Model, ModelSignature
from mlflow.models.utils import SERVING_INPUT_FILENAME, SERVING_INPUT_PATH
from mlflow.types.schema import AnyType, ColSpec

from common.registry import INPUT_TYPES_METADATA
from serving.deployment import BatchingSettings, Deployment

SERVING_EXAMPLE_FILE = SERVING_INPUT_FILENAME


TYPE_ANNOTATION = "x-flowline-type"


def read_model_metadata(model_dir: str | Path) -> dict[str, Any]:
    """{"signature": MLmodel's signature dict or None, "input_example": request body or None}.

    Input columns the signature declares ``any`` carry the exact type from the model's
    ``flowline.input_types`` metadata under ``x-flowline-type``, for the OpenAPI page.
    """
    model_dir = Path(model_dir)
    # Model.load parses MLmodel as the scorer will: a signature it cannot read fails here,
    # at rollout, not on the replica.
    model = Model.load(str(model_dir))
    example_info = model.saved_input_example_info or {}
    # Not Model.get_serving_input: a model without saved_input_example_info may still
    # carry the file under MLflow's default name (the reconciler downloads exactly that).
    example_path = model_dir / example_info.get(SERVING_INPUT_PATH, SERVING_EXAMPLE_FILE)
    # MLflow writes NaN for a missing value in the example; the example is sent as a JSON
    # body (admin API, /openapi.json, the smoke test), and strict JSON spells it null.
    example = (
        json.loads(example_path.read_text(), parse_constant=lambda _: None)
        if example_path.is_file()
        else None
    )
    types = (model.metadata or {}).get(INPUT_TYPES_METADATA)
    return {"signature": _annotated(model.signature, types), "input_example": example}


def _annotated(signature: ModelSignature | None, types: Any) -> dict[str, Any] | None:
    """The signature in MLmodel's dict form, ``any`` inputs annotated with their type."""
    if signature is None:
        return None
    wire = signature.to_dict()
    if signature.inputs is None or not isinstance(types, dict):
        return wire
    specs = []
    for column in signature.inputs.inputs:
        spec = column.to_dict()
        # ColSpec has no room for a type MLflow does not know: it travels beside it.
        if (
            isinstance(column, ColSpec)
            and isinstance(column.type, AnyType)
            and isinstance(types.get(column.name), str)
        ):
            spec[TYPE_ANNOTATION] = types[column.name]
        specs.append(spec)
    return {**wire, "inputs": json.dumps(specs)}


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
