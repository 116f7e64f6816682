"""The registry contract: every name flowline reads or writes in the MLflow registry.

Training writes run and version tags, the user promotes in the registry UI, the
controller reads the promotion and the per-model settings and writes the rollout
status back, the monitor reads the baseline tag and tags its own runs. Each of
those names is spelled here once, so that a writer and its readers cannot drift
apart. Tags are documented in docs/serving.md and docs/monitoring.md.

This module imports nothing of flowline's or MLflow's: every package may import it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

TAG_PREFIX = "flowline."

# --- the promotion: what the controller serves ----------------------------------------
PRODUCTION_ALIAS = "production"
PRODUCTION_STAGE = "Production"  # the legacy stage, still honoured
DEMO_MODEL = "flowline-demo"
# A second and a third version beside production (docs/serving.md, "Canary and shadow"):
# the canary answers a weighted share of the callers, the shadow gets a mirrored copy of
# a sample of production's requests and never answers anyone.
CANARY_ALIAS = "canary"
SHADOW_ALIAS = "shadow"

# --- written by training, on the parent run and on the registered version --------------
TASK_TAG = "flowline.task"
FAMILY_TAG = "flowline.family"
METRIC_TAG = "flowline.metric"
METRIC_VALUE_TAG = "flowline.metric_value"
DATA_FINGERPRINT_TAG = "flowline.data_fingerprint"
DROPPED_COLUMNS_TAG = "flowline.dropped_columns"
TRAINING_ROWS_TAG = "flowline.training_rows"
PARENT_RUN_TAG = "flowline.parent_run_id"
REGISTERED_VERSION_TAG = "flowline.registered_version"
# How the version scores (pipelines/onnx_export.py): "onnx" when training proved the ONNX
# graph equivalent to the pipeline, else "python"; the reason says which check decided.
RUNTIME_TAG = "flowline.runtime"
RUNTIME_REASON_TAG = "flowline.runtime.reason"
# The baseline profile's path inside the version's run artifacts (see docs/baseline-format.md).
BASELINE_TAG = "flowline.baseline"
# On each hyperopt trial's nested run.
TRIAL_TAG = "flowline.trial"
ERROR_TAG = "flowline.error"

# --- on a registered model: how the controller serves it (set by the user) -------------
REPLICAS_MODEL_TAG = "flowline.replicas"
BATCHING_MODEL_TAG = "flowline.batching"
# Seconds one replica call may take before the caller gets 504 (default: the gateway's).
TIMEOUT_MODEL_TAG = "flowline.timeout_s"
# Requests per API key the gateway lets through to the model, a rate like "50/second"
# (default: the gateway's FLOWLINE_RATE_LIMITS, if set).
RATE_LIMIT_MODEL_TAG = "flowline.rate_limit"
# The gateway's response cache for the model, JSON {"ttl_s": 60, "max_entries": 10000}.
CACHE_MODEL_TAG = "flowline.cache"
BACKEND_MODEL_TAG = "flowline.backend"
RESOURCES_MODEL_TAG = "flowline.resources"
# JSON {"weight": 10} (percent of requests, 0-100), optional "sticky": "<header name>".
CANARY_MODEL_TAG = "flowline.canary"
# JSON {"sample": 0.25} (share of production's successful requests mirrored, 0-1).
SHADOW_MODEL_TAG = "flowline.shadow"
# Written by the controller when it refuses a canary or shadow (removed once it is fixed).
CANARY_ERROR_MODEL_TAG = "flowline.canary.error"
SHADOW_ERROR_MODEL_TAG = "flowline.shadow.error"

# --- on a model version: the rollout's outcome (written by the controller) -------------
STATUS_TAG = "flowline.deployment.status"
REASON_TAG = "flowline.deployment.reason"

# --- on a model version: the champion/challenger gate (written by training, read by the
# controller; the override is set by a person, in the registry UI) -------------------------
GATE_TAG = "flowline.gate"  # passed | failed | skipped
GATE_REASON_TAG = "flowline.gate.reason"
GATE_METRIC_TAG = "flowline.gate.metric"
GATE_CHALLENGER_TAG = "flowline.gate.challenger_score"
GATE_CHAMPION_TAG = "flowline.gate.champion_score"
GATE_CHAMPION_VERSION_TAG = "flowline.gate.champion_version"
GATE_TOLERANCE_TAG = "flowline.gate.tolerance"
GATE_OVERRIDE_TAG = "flowline.gate.override"  # "true" lets a failed version through


def production_version(model: Any) -> str | None:
    """The version a registered model (mlflow's RegisteredModel) serves in production:
    the one with the alias ``production``, else the newest in the legacy stage."""
    version = model.aliases.get(PRODUCTION_ALIAS) if model.aliases else None
    if version is None:
        staged = [v for v in model.latest_versions or [] if v.current_stage == PRODUCTION_STAGE]
        if staged:
            version = max(staged, key=lambda v: int(v.version)).version
    return None if version is None else str(version)


def gate_blocks(tags: dict[str, str]) -> bool:
    """Whether a version's tags keep it out of production: its gate failed and nobody
    set the override."""
    failed = tags.get(GATE_TAG) == "failed"
    return failed and tags.get(GATE_OVERRIDE_TAG, "").strip().lower() != "true"


@dataclass(frozen=True)
class CanaryConfig:
    """The canary's share of a model's requests (percent) and its optional sticky header."""

    weight: float
    sticky: str | None = None


def _tag_object(text: str, tag: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError(f"{tag} is not JSON: {text[:80]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{tag} must be a JSON object, not {text[:80]!r}")
    return data


def _number(value: Any, what: str, low: float, high: float) -> float:
    # bool is an int to Python, but `true` is no weight.
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{what} must be a number from {low:g} to {high:g}, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{what} must be from {low:g} to {high:g}, not {value!r}")
    return float(value)


def canary_weight(value: Any) -> float:
    """A canary weight: a number of percent from 0 to 100 (ValueError if not)."""
    return _number(value, "the canary weight", 0, 100)


def shadow_sample(value: Any) -> float:
    """A shadow sample: a share of requests from 0 to 1 (ValueError if not)."""
    return _number(value, "the shadow sample", 0, 1)


def sticky_header(value: Any) -> str | None:
    """A sticky header name, or None (ValueError for anything but a non-empty string)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or any(c in value for c in ":\r\n "):
        raise ValueError(f"sticky must be an HTTP header name, not {value!r}")
    return value.strip().lower()


def parse_canary_tag(text: str | None) -> CanaryConfig:
    """The `flowline.canary` tag's settings; ValueError (the reason) when it is missing or bad."""
    if text is None:
        raise ValueError(f'the canary needs the tag {CANARY_MODEL_TAG}, e.g. {{"weight": 10}}')
    data = _tag_object(text, CANARY_MODEL_TAG)
    unknown = set(data) - {"weight", "sticky"}
    if unknown:
        raise ValueError(f"{CANARY_MODEL_TAG} has unknown keys {sorted(unknown)}")
    if "weight" not in data:
        raise ValueError(f'{CANARY_MODEL_TAG} needs a "weight" (percent, 0-100)')
    return CanaryConfig(canary_weight(data["weight"]), sticky_header(data.get("sticky")))


def parse_shadow_tag(text: str | None) -> float:
    """The `flowline.shadow` tag's sample (1.0 without the tag); ValueError when bad."""
    if text is None:
        return 1.0
    data = _tag_object(text, SHADOW_MODEL_TAG)
    unknown = set(data) - {"sample"}
    if unknown:
        raise ValueError(f"{SHADOW_MODEL_TAG} has unknown keys {sorted(unknown)}")
    return shadow_sample(data.get("sample", 1.0))


# --- on runs of other jobs ---------------------------------------------------------------
BATCH_MODEL_TAG = "flowline.model"
BATCH_VERSION_TAG = "flowline.version"
BATCH_MODEL_URI_TAG = "flowline.model_uri"
MONITOR_KIND_TAG = "flowline.monitor"
MONITOR_MODEL_TAG = "flowline.monitor.model"
MONITOR_VERSION_TAG = "flowline.monitor.version"

# --- model metadata (MLmodel), beside the signature: each input column's type (one of
# monitoring.profile.column_types.TYPES), written by training, read for the OpenAPI page.
INPUT_TYPES_METADATA = "flowline.input_types"

# --- canary analysis (serving/controller/analysis.py; docs/serving.md) ---------------------
# On a registered model: JSON thresholds of the automatic canary analysis, e.g.
# {"interval_s": 60, "max_error_rate_increase": 0.01, "promote_after": 5}.
ANALYSIS_MODEL_TAG = "flowline.analysis"
# Written by the controller when that tag cannot be used (removed once it is fixed).
ANALYSIS_ERROR_MODEL_TAG = "flowline.analysis.error"
# On a model version, written by the controller:
ANALYSIS_VERDICT_TAG = "flowline.analysis.verdict"  # passing | failed | promoted
ANALYSIS_CHECK_TAG = "flowline.analysis.check"  # the failing check: error_rate, p99, ...
ANALYSIS_REASON_TAG = "flowline.analysis.reason"  # the check's numbers, in words
ANALYSIS_PASSED_TAG = "flowline.analysis.passed"  # passing intervals in a row


def analysis_blocks(tags: dict[str, str]) -> bool:
    """Whether a version was rolled back by the canary analysis (it takes no canary or
    shadow traffic again until a person removes ``flowline.analysis.verdict``)."""
    return tags.get(ANALYSIS_VERDICT_TAG) == "failed"
