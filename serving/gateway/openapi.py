"""OpenAPI 3.1 document and the Swagger UI docs page, built from deployed signatures.

The Swagger UI assets come from the pinned `swagger-ui-py` package (Swagger UI 5,
which renders OpenAPI 3.1) and are served by the gateway itself under
/docs/assets: the page loads nothing from the network beyond the gateway.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import jinja2

from serving.deployment import Deployment

_SCALARS: dict[str, dict[str, Any]] = {
    "double": {"type": "number", "format": "double"},
    "float": {"type": "number", "format": "float"},
    "long": {"type": "integer", "format": "int64"},
    "integer": {"type": "integer", "format": "int32"},
    "boolean": {"type": "boolean"},
    "string": {"type": "string"},
    "binary": {"type": "string", "contentEncoding": "base64"},
    "datetime": {"type": "string", "format": "date-time"},
}
_NUMPY: dict[str, dict[str, Any]] = {
    "float64": _SCALARS["double"],
    "float32": _SCALARS["float"],
    "int64": _SCALARS["long"],
    "int32": _SCALARS["integer"],
    "bool": _SCALARS["boolean"],
    "str": _SCALARS["string"],
    "object": {},
}

ERROR_SCHEMA = {
    "type": "object",
    "description": "MLflow error. Gateway errors carry only error_code and message.",
    "required": ["error_code", "message"],
    "properties": {
        "error_code": {"type": "string", "examples": ["BAD_REQUEST"]},
        "message": {"type": "string"},
    },
    "additionalProperties": True,
}


# What a flowline model's column accepts (pipelines/columns.py); null is always accepted.
_FLOWLINE_TYPES: dict[str, dict[str, Any]] = {
    "integer": {"type": ["integer", "null"]},
    "float": {"type": ["number", "null"]},
    "boolean": {
        "type": ["boolean", "string", "null"],
        "description": "true/false, or one of the strings true, false, yes, no, t, f, y, n, 1, 0",
    },
    "datetime": {
        "type": ["string", "null"],
        "description": "ISO-8601 date or date-time (YYYY-MM-DD[THH:MM:SS][zone])",
    },
    "string": {"type": ["string", "null"]},
}


def type_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """JSON schema of one MLflow column/tensor/param spec."""
    kind = spec.get("type")
    if kind == "tensor":
        tensor = spec.get("tensor-spec", {})
        schema: dict[str, Any] = dict(_NUMPY.get(str(tensor.get("dtype")), {}))
        for _ in tensor.get("shape", [])[1:]:
            schema = {"type": "array", "items": schema}
        return schema
    if kind == "array":
        return {"type": "array", "items": type_schema(spec.get("items", {}))}
    if kind == "object":
        # MLflow's Object.to_dict() gives properties as {name: spec}; older forms, a list.
        properties = spec.get("properties") or {}
        if isinstance(properties, dict):
            props = {name: type_schema(prop) for name, prop in properties.items()}
        else:
            props = {prop["name"]: type_schema(prop) for prop in properties}
        return {"type": "object", "properties": props}
    if kind == "map":
        return {"type": "object", "additionalProperties": type_schema(spec.get("values", {}))}
    if kind == "any":
        # A flowline-trained column: MLflow checks nothing, the model checks this type.
        return dict(_FLOWLINE_TYPES.get(str(spec.get("x-flowline-type")), {}))
    return dict(_SCALARS.get(str(kind), {}))


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if "type" in schema and isinstance(schema["type"], str):
        return {**schema, "type": [schema["type"], "null"]}
    return schema


def _column_schema(spec: dict[str, Any]) -> dict[str, Any]:
    schema = type_schema(spec)
    return schema if spec.get("required", True) else _nullable(schema)


def _param_schema(spec: dict[str, Any]) -> dict[str, Any]:
    schema = type_schema(spec)
    if spec.get("shape") is not None:
        # A param with a shape takes a list of values.
        schema = {"type": "array", "items": schema}
    if "default" in spec:
        schema = {**schema, "default": spec["default"]}
    return schema


def request_schema(deployment: Deployment) -> dict[str, Any]:
    """JSON body schema: one of dataframe_split / dataframe_records / instances / inputs."""
    columns = deployment.input_columns()
    params = deployment.params_spec()
    params_schema: dict[str, Any] = {"type": "object"}
    if params:
        params_schema["properties"] = {p["name"]: _param_schema(p) for p in params}
        params_schema["additionalProperties"] = False
    named = bool(columns) and all("name" in c for c in columns)
    if named:
        assert columns is not None
        names = [c["name"] for c in columns]
        required = [c["name"] for c in columns if c.get("required", True)]
        # The stock scorer refuses empty inputs (400), so the spec asks for a row at least.
        record = {
            "type": "object",
            "properties": {c["name"]: _column_schema(c) for c in columns},
            "required": required,
        }
        split = {
            "type": "object",
            "required": ["columns", "data"],
            "properties": {
                "columns": {
                    "type": "array",
                    "items": {"type": "string", "enum": names},
                    "uniqueItems": True,
                    "minItems": len(required),
                    "examples": [names],
                },
                "data": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "array",
                        "prefixItems": [_column_schema(c) for c in columns],
                        "minItems": len(columns),
                        "maxItems": len(columns),
                    },
                },
                "index": {"type": "array", "description": "One label per row of data."},
            },
            "additionalProperties": False,
        }
        columnar = {
            "type": "object",
            "properties": {
                c["name"]: {"type": "array", "minItems": 1, "items": _column_schema(c)}
                for c in columns
            },
            "required": required,
        }
        records = {"type": "array", "minItems": 1, "items": record}
        inputs: dict[str, Any] = {"oneOf": [columnar, records]}
    else:
        item = type_schema(columns[0]) if columns else {}
        split = {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "array", "minItems": 1}},
        }
        records = {"type": "array", "minItems": 1, "items": {"type": "object"}}
        inputs = {"type": "array", "minItems": 1, "items": item} if columns else {}

    def body(key: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "required": [key],
            "properties": {key: schema, "params": params_schema},
            "additionalProperties": False,
        }

    return {
        "oneOf": [
            body("dataframe_split", split),
            body("dataframe_records", records),
            body("instances", records if named else inputs),
            body("inputs", inputs),
        ]
    }


def response_schema(deployment: Deployment) -> dict[str, Any]:
    """`{"predictions": [...]}` with the signature's output types where known."""
    outputs = deployment.output_spec()
    item: dict[str, Any] = {}
    if outputs and len(outputs) == 1 and "name" not in outputs[0]:
        item = type_schema(outputs[0])
        if outputs[0].get("type") == "tensor":
            # The first tensor dimension is the row; a prediction is one row of it.
            item = item if item.get("type") != "array" else item.get("items", {})
    elif outputs:
        item = {
            "type": "object",
            "properties": {o["name"]: _column_schema(o) for o in outputs if "name" in o},
        }
    return {
        "type": "object",
        "required": ["predictions"],
        "properties": {"predictions": {"type": "array", "items": item}},
    }


def _invocation_operation(deployment: Deployment, summary: str) -> dict[str, Any]:
    columns = deployment.input_columns() or []
    header = ",".join(c["name"] for c in columns if "name" in c)
    csv_description = f"Header row: {header}" if header else "CSV with a header row."
    json_content: dict[str, Any] = {"schema": request_schema(deployment)}
    if deployment.input_example is not None:
        json_content["example"] = deployment.input_example
    error = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
    return {
        "summary": summary,
        "description": f"Scores rows with {deployment.label}. Wire format of `mlflow models "
        "serve`: JSON (one of dataframe_split, dataframe_records, instances, inputs, plus "
        "optional params), CSV with a header row, or Parquet.",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": json_content,
                "text/csv": {"schema": {"type": "string", "description": csv_description}},
                "application/vnd.apache.parquet": {
                    "schema": {"type": "string", "format": "binary"}
                },
            },
        },
        "responses": {
            "200": {
                "description": "Predictions, one per input row.",
                "headers": {
                    "X-Flowline-Model-Version": {
                        "schema": {"type": "string"},
                        "description": "name/version",
                    }
                },
                "content": {"application/json": {"schema": response_schema(deployment)}},
            },
            "400": {"description": "Invalid input (as the stock scorer).", **error},
            "401": {"description": "Missing or wrong API key.", **error},
            "404": {"description": "Model not deployed.", **error},
            "413": {"description": "Body too large.", **error},
            "415": {
                "description": "Missing Content-Type (MLflow error body; stock answers 500), "
                "or a content type or charset the scorer does not take (plain text, as stock).",
                "content": {
                    "application/json": {"schema": ERROR_SCHEMA},
                    "text/plain": {"schema": {"type": "string"}},
                },
            },
            "408": {"description": "The body was not sent in time.", **error},
            "503": {"description": "Overloaded or no replica reachable; see Retry-After.", **error},
            "504": {"description": "The replica did not answer in time.", **error},
        },
    }


def build_openapi(
    deployments: list[Deployment], default: Deployment | None, api_keys: bool = False
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the currently deployed models.

    With `api_keys` (the gateway has keys configured) the document declares the
    bearer scheme and requires it on every operation but the public probes and
    metrics, so Swagger UI shows its Authorize button and sends the key; without
    keys it declares no security at all, as nothing asks for a key.
    """
    paths: dict[str, Any] = {}
    if default is not None:
        paths["/invocations"] = {
            "post": _invocation_operation(
                default, f"Score with the default model ({default.label})"
            )
        }
    for d in deployments:
        paths[f"/models/{d.model}/invocations"] = {
            "post": _invocation_operation(d, f"Score with {d.label}")
        }
    plain = {"200": {"description": "OK"}}
    paths["/models"] = {
        "get": {"summary": "Deployed models, versions and replica health", "responses": plain}
    }
    public = {"security": []} if api_keys else {}
    paths["/ping"] = {"get": {"summary": "Liveness", **public, "responses": plain}}
    paths["/health"] = {"get": {"summary": "Readiness", **public, "responses": plain}}
    paths["/metrics"] = {"get": {"summary": "Prometheus metrics", **public, "responses": plain}}
    if not api_keys:
        for path in paths.values():
            for operation in path.values():
                operation["responses"].pop("401", None)
    components: dict[str, Any] = {"schemas": {"Error": ERROR_SCHEMA}}
    if api_keys:
        components["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "One of the gateway's API keys (FLOWLINE_API_KEYS).",
            }
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "flowline gateway",
            "version": "1",
            "description": "Scoring endpoints of the deployed MLflow models. Models: "
            + (", ".join(d.label for d in deployments) or "none"),
        },
        "paths": paths,
        "components": components,
    }
    if api_keys:
        document["security"] = [{"bearer": []}]
    return document


def render_docs(
    deployments: list[Deployment], default: Deployment | None, api_keys: bool = False
) -> str:
    """The /docs page: Swagger UI over ./openapi.json, then each model's columns and example.

    Scripts and styles are loaded from docs/assets, relative to the page, so
    nothing comes from another host; the model summary below is the same information as
    Swagger's schemas, in a table a reader can scan without expanding anything.
    """
    models = [_docs_section(d, d is default) for d in deployments]
    return (
        _templates()
        .get_template("docs.html")
        .render(models=models, api_keys=api_keys, locked=False)
    )


def render_locked_docs() -> str:
    """The /docs page for a page load without a key while keys are on: it asks for the
    key and then loads Swagger UI with it; it holds nothing about the deployed models."""
    return _templates().get_template("docs.html").render(models=[], api_keys=True, locked=True)


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's dist files (swagger-ui-bundle.js, swagger-ui.css) that
    the gateway serves at /docs/assets; found without importing the package."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed (a pinned gateway dependency)")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@functools.cache
def _templates() -> jinja2.Environment:
    # Built on first use, not at import: the loader looks up the package being imported.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("serving.gateway"),
        autoescape=jinja2.select_autoescape(),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _docs_section(d: Deployment, is_default: bool) -> dict[str, Any]:
    # Plain strings for the template; it escapes them all (autoescape).
    columns = [
        {
            "name": str(c.get("name", "(unnamed)")),
            "type": _type_label(c),
            "required": c.get("required", True),
        }
        for c in d.input_columns() or []
    ]
    params = [
        {"name": p["name"], "type": _type_label(p), "default": json.dumps(p.get("default"))}
        for p in d.params_spec() or []
    ]
    outputs = ", ".join(_type_label(o) for o in d.output_spec() or []) or "unknown"
    return {
        "model": d.model,
        "version": d.version,
        "is_default": is_default,
        "columns": columns,
        "params": params,
        "outputs": outputs,
        "example": json.dumps(d.input_example, indent=2) if d.input_example else None,
        "curl": "curl -X POST -H 'Content-Type: application/json' "
        f"--data @request.json http://HOST/models/{d.model}/invocations",
    }


def _type_label(spec: dict[str, Any]) -> str:
    kind = spec.get("type", "?")
    if kind == "tensor":
        tensor = spec.get("tensor-spec", {})
        return f"tensor {tensor.get('dtype')} {tensor.get('shape')}"
    if kind == "array":
        return f"array<{_type_label(spec.get('items', {}))}>"
    return str(spec.get("x-flowline-type", kind))
