"""What the controller reads from a saved model for the gateway: strict-JSON examples and
each `any` column's exact type, which the OpenAPI document then shows."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from serving.gateway.openapi import type_schema
from serving.model_metadata import deployment_from_model_dir, read_model_metadata


def _model_dir(tmp_path: Path) -> Path:
    inputs = [
        {"type": "any", "name": "age", "required": True},
        {"type": "any", "name": "city", "required": True},
        {"type": "double", "name": "plain", "required": True},
    ]
    mlmodel = {
        "signature": {"inputs": json.dumps(inputs), "outputs": None, "params": None},
        "metadata": {"flowline.input_types": {"age": "integer", "city": "string"}},
    }
    (tmp_path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    # As MLflow writes an example with a missing value: a bare NaN, not valid JSON.
    (tmp_path / "serving_input_example.json").write_text(
        '{"dataframe_split": {"columns": ["age", "city", "plain"], "data": [[NaN, "x", 1.5]]}}'
    )
    return tmp_path


def test_example_nan_becomes_null_and_the_deployment_is_strict_json(tmp_path: Path) -> None:
    meta = read_model_metadata(_model_dir(tmp_path))
    assert meta["input_example"]["dataframe_split"]["data"] == [[None, "x", 1.5]]
    deployment = deployment_from_model_dir("m", "1", ["http://127.0.0.1:1"], tmp_path)
    json.dumps(deployment.to_dict(), allow_nan=False)  # what the controller PUTs


def test_any_columns_carry_their_flowline_type_into_the_openapi_schema(tmp_path: Path) -> None:
    meta = read_model_metadata(_model_dir(tmp_path))
    specs = {s["name"]: s for s in json.loads(meta["signature"]["inputs"])}
    assert specs["age"]["x-flowline-type"] == "integer"
    assert "x-flowline-type" not in specs["plain"]
    assert type_schema(specs["age"]) == {"type": ["integer", "null"]}
    assert type_schema(specs["city"]) == {"type": ["string", "null"]}
    assert type_schema(specs["plain"]) == {"type": "number", "format": "double"}
    assert type_schema({"type": "any", "name": "unknown"}) == {}
