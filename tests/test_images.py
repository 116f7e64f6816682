"""Units of the docker backend that need no daemon: digests, tags, requirements, the
resources tag, build-log errors, the mirror lookup, and what a logged model carries."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.train import model_code_paths
from serving.backends.base import BackendError
from serving.backends.docker import Resources
from serving.images.base import FALLBACK_MIRROR, host_mirror
from serving.images.builder import (
    last_error_line,
    model_image_tag,
    requirements_of,
    slug,
    tree_digest,
)
from tests.conftest import REPO


def test_the_digest_follows_content_and_path_not_time(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "model.pkl").write_bytes(b"\x00\x01")
    first = tree_digest(tmp_path, salt=("1", "sha256:base"))
    (tmp_path / "model.pkl").touch()
    assert tree_digest(tmp_path, salt=("1", "sha256:base")) == first
    assert tree_digest(tmp_path, salt=("1", "sha256:other")) != first
    (tmp_path / "model.pkl").write_bytes(b"\x00\x02")
    assert tree_digest(tmp_path, salt=("1", "sha256:base")) != first
    (tmp_path / "model.pkl").write_bytes(b"\x00\x01")
    (tmp_path / "model.pkl").rename(tmp_path / "moved.pkl")
    assert tree_digest(tmp_path, salt=("1", "sha256:base")) != first


@pytest.mark.parametrize(
    "name, expected",
    [("Churn Model", "churn-model"), ("a/b:c", "a-b-c"), ("__", "model"), ("x" * 99, "x" * 60)],
)
def test_names_become_valid_docker_repository_parts(name: str, expected: str) -> None:
    assert slug(name) == expected
    tag = model_image_tag(name, "12", "f" * 64)
    assert tag == f"flowline-model/{expected}:v12-{'f' * 16}"


def test_requirements_add_mlflow_only_when_missing(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("# a comment\nscikit-learn==1.9.1\n\npandas\n")
    (tmp_path / "python_env.yaml").write_text(
        "python: 3.11.7\nbuild_dependencies:\n- pip==26.3\n- wheel\n"
        "dependencies:\n- -r requirements.txt\n"
    )
    requirements, build = requirements_of(tmp_path)
    assert requirements[:2] == ["scikit-learn==1.9.1", "pandas"]
    assert requirements[2].startswith("mlflow==")
    assert build == ["pip==26.3", "wheel"]
    (tmp_path / "requirements.txt").write_text("mlflow[gateway]==3.17.2\n")
    assert requirements_of(tmp_path)[0] == ["mlflow[gateway]==3.17.2"]


def test_the_reason_is_the_builds_own_error_line() -> None:
    log = (
        "Collecting flowline-no-such-package==0.0.1\n"
        "ERROR: Could not find a version that satisfies the requirement flowline-no-such-package\n"
        "ERROR: No matching distribution found for flowline-no-such-package==0.0.1\n"
        "\n"
    )
    assert last_error_line(log) == (
        "ERROR: No matching distribution found for flowline-no-such-package==0.0.1"
    )
    assert last_error_line("step 1\nKilled\n") == "Killed"
    assert last_error_line("") == "the image build failed"


def test_resources_come_from_the_tag_with_defaults() -> None:
    assert Resources.parse(None, 1.0, "2g") == Resources(1.0, 2 * 1024**3)
    assert Resources.parse('{"cpus": 0.5, "memory": "768m"}', 1.0, "2g") == Resources(
        0.5, 768 * 1024**2
    )
    assert Resources.parse('{"memory": "1.5g"}', 2.0, "2g").cpus == 2.0


@pytest.mark.parametrize(
    "tag, words",
    [
        ("not json", "invalid"),
        ('{"cpu": 1}', "invalid"),
        ('{"memory": "lots"}', "invalid"),
        ('{"memory": "10m"}', "at least 64m"),
        ('{"cpus": 0}', "between"),
        ('{"cpus": 4096}', "between"),
        ("[1, 2]", "invalid"),
    ],
)
def test_a_bad_resources_tag_is_one_clear_error(tag: str, words: str) -> None:
    with pytest.raises(BackendError, match=words) as caught:
        Resources.parse(tag, 1.0, "2g")
    assert "flowline.resources" in str(caught.value) and "\n" not in str(caught.value)


def test_the_mirror_is_the_hosts_own(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n"
    )
    assert host_mirror(tmp_path) == "http://mirror.example/debian"
    assert host_mirror(tmp_path / "nowhere") == FALLBACK_MIRROR


def test_a_logged_model_carries_every_module_its_pipeline_imports(tmp_path: Path) -> None:
    paths = [Path(p) for p in model_code_paths(tmp_path)]
    assert [p.name for p in paths] == ["pipelines", "monitoring"]
    assert sorted(f.name for f in paths[1].iterdir()) == ["__init__.py", "profile"]
    shipped = paths[1] / "profile"
    assert sorted(f.name for f in shipped.iterdir()) == ["__init__.py", "column_types.py"]
    # The shipped column-type contract must import nothing of flowline's own beyond itself.
    source = (shipped / "column_types.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert all(
        line.split()[1].split(".")[0] in {"__future__", "typing", "numpy", "pandas"}
        for line in imports
    ), imports
    for module in (
        paths[0] / "columns.py",
        paths[0] / "pyfunc_model.py",
        paths[0] / "preprocess.py",
    ):
        for line in module.read_text().splitlines():
            if line.startswith("from monitoring"):
                assert line == "from monitoring.profile import column_types", (module, line)


def test_the_model_code_imports_with_only_the_models_requirements() -> None:
    # What the pickled pipelines of both families import when a replica loads them (the
    # sklearn family pickles only scikit-learn classes beside these), with
    # flowline's training and monitoring dependencies made unimportable, as in an image.
    script = (
        "import sys\n"
        "for name in ('hyperopt', 'datasketches', 'pyspark', 'monitoring.profile.baseline', "
        "'monitoring.capture', 'monitoring.service', 'serving', 'common', 'flowline'):\n"
        "    sys.modules[name] = None\n"
        "import pipelines.pyfunc_model, pipelines.preprocess, pipelines.columns\n"
        "import pipelines.keras_family\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
