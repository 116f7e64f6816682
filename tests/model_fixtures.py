"""Small pyfunc models for serving tests, pickled by value so replicas need no test code."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd


class FailsOnExample(mlflow.pyfunc.PythonModel):
    """Loads and answers /ping, but every prediction fails: the smoke test must catch it."""

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> Any:
        """Always raise, as a version with a broken preprocessing step would."""
        raise ValueError("this version is broken on purpose")


def log_broken_version(name: str) -> str:
    """Register a version of ``name`` that starts fine and fails its smoke test."""
    return log_model_with_requirements(name, ["mlflow"])


def log_model_with_requirements(name: str, requirements: list[str]) -> str:
    """Register a small version of ``name`` whose requirements.txt is ``requirements``
    (a version whose image cannot be built, when one of them does not exist)."""
    import cloudpickle

    import tests.model_fixtures as module

    cloudpickle.register_pickle_by_value(module)
    example = pd.DataFrame({"x": [1.0, 2.0]})
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=FailsOnExample(),
            input_example=example,
            signature=mlflow.models.infer_signature(example, [0.0, 0.0]),
            pip_requirements=requirements,
            registered_model_name=name,
        )
    return str(info.registered_model_version)


class FailsOnManyCalls(mlflow.pyfunc.PythonModel):
    """Answers "no" for every row, but a request with a row of 3 or more support calls
    fails: it passes its smoke test (its example has none) and fails live traffic."""

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> Any:
        """Fail like a version with a bug on a region of the inputs."""
        if (pd.to_numeric(model_input["support_calls"], errors="coerce") >= 3).any():
            raise ValueError("this version fails on many support calls, on purpose")
        return ["no"] * len(model_input)


def log_flaky_version(name: str, features: pd.DataFrame) -> str:
    """Register a version of ``name`` that takes ``features``' columns and fails on rows
    with 3 or more support calls (see FailsOnManyCalls)."""
    import cloudpickle

    import tests.model_fixtures as module

    cloudpickle.register_pickle_by_value(module)
    example = features[features["support_calls"] < 3].head(3)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=FailsOnManyCalls(),
            input_example=example,
            signature=mlflow.models.infer_signature(features, ["no"] * len(features)),
            pip_requirements=["mlflow"],
            registered_model_name=name,
        )
    return str(info.registered_model_version)
