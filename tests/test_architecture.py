"""The layout's rules hold: imports point down the data flow (docs/architecture.md).

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them
on the real tree, and on a copy with one forbidden import added, to show each
contract would catch a breach.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "flowline", "projects", "pipelines", "serving", "monitoring")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the packages under ``root`` with the project's contracts."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_every_import_contract() -> None:
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "bad_import", "contract"),
    [
        ("common/registry.py", "import serving.deployment", "common/ imports none of them"),
        ("monitoring/drift/stats.py", "import pipelines.columns", "down the data flow"),
        ("serving/deployment.py", "import serving.controller.desired", "serving:"),
        ("serving/controller/desired.py", "import serving.gateway.routes", "serving:"),
        ("monitoring/profile/baseline.py", "import monitoring.drift.stats", "monitoring:"),
        (
            "monitoring/service/store.py",
            "import monitoring.capture.client",
            "never imports the gateway-side capture client",
        ),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    tmp_path: Path, module: str, bad_import: str, contract: str
) -> None:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{bad_import}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout[-3000:]
    broken = [line for line in done.stdout.splitlines() if line.rstrip().endswith("BROKEN")]
    assert any(contract in line for line in broken), done.stdout[-3000:]
