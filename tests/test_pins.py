"""conda.yaml and pyproject.toml must pin the same packages at the same versions."""

import tomllib

import yaml

from tests.conftest import REPO


def _pyproject_pins() -> set[str]:
    with (REPO / "pyproject.toml").open("rb") as handle:
        return set(tomllib.load(handle)["project"]["dependencies"])


def _conda_pins() -> set[str]:
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return set(pip)


def test_conda_yaml_pins_match_pyproject() -> None:
    assert _conda_pins() == _pyproject_pins()


def test_every_dependency_is_pinned_exactly() -> None:
    loose = [dep for dep in _pyproject_pins() if "==" not in dep]
    assert loose == []


def test_mlflow_pin_is_the_installable_release() -> None:
    assert "mlflow==3.17.2" in _pyproject_pins()


def test_conda_python_matches_requires_python() -> None:
    env = yaml.safe_load((REPO / "conda.yaml").read_text())
    assert "python=3.11" in env["dependencies"]
    with (REPO / "pyproject.toml").open("rb") as handle:
        assert tomllib.load(handle)["project"]["requires-python"] == ">=3.11,<3.12"
