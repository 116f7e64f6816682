"""Apache Spark for tuning and batch scoring: one session per job, its failures as one line.

``master`` is what ``spark-submit --master`` takes: ``local[N]`` / ``local[*]`` runs Spark
in this process's JVM with no cluster; ``spark://host:port``, ``yarn`` and ``k8s://...``
use a cluster the user operates. flowline never starts a cluster.

Local masters bind the driver to 127.0.0.1 so nothing listens beyond loopback, and run
executors with this interpreter (the same venv, hence the same pins). On a cluster the
executors need flowline's pins installed (a cluster image, or ``spark.archives`` with a
packed venv): see docs/spark.md.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from typing import Any
from urllib.parse import urlparse

from pipelines.errors import UserError

_LOCAL = re.compile(r"^local(\[(\*|\d+)(,\d+)?\])?$")
CONNECT_TIMEOUT_S = 5.0


def is_local(master: str) -> bool:
    """Whether ``master`` runs Spark inside this machine's JVM (no cluster)."""
    return bool(_LOCAL.match(master))


def check_master(master: str) -> None:
    """Reject a master URL Spark would not take, or a standalone master that is not there."""
    if is_local(master) or master == "yarn" or master.startswith("k8s://"):
        return
    if not master.startswith("spark://"):
        raise UserError(
            f"unknown Spark master '{master}': use local[N], local[*], spark://host:port, "
            "yarn or k8s://https://host:port"
        )
    for hostport in master.removeprefix("spark://").split(","):
        parsed = urlparse(f"spark://{hostport}")
        try:
            with socket.create_connection(
                (parsed.hostname or "", parsed.port or 7077), timeout=CONNECT_TIMEOUT_S
            ):
                return
        except (OSError, ValueError):
            continue
    raise UserError(f"cannot reach the Spark master at {master}: is the cluster up?")


def check_java() -> None:
    """Spark needs a Java runtime: on PATH or under JAVA_HOME."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(os.path.join(java_home, "bin", "java"), os.X_OK):
        return
    if shutil.which("java") is None:
        raise UserError(
            "Java is missing: Spark needs a Java 17 or newer runtime "
            "(install one, e.g. `apt-get install openjdk-17-jre-headless`, or set JAVA_HOME)"
        )


def spark_session(master: str, app_name: str) -> Any:
    """A SparkSession on ``master``, after checking Java and the master first."""
    check_master(master)
    check_java()
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName(app_name)
    builder = builder.config("spark.ui.enabled", "false")
    # flowline prints one line per finished trial; Spark's progress bar would garble them.
    builder = builder.config("spark.ui.showConsoleProgress", "false")
    if is_local(master):
        # Executors are this interpreter; the driver listens on loopback only.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = builder.config("spark.driver.host", "127.0.0.1")
        builder = builder.config("spark.driver.bindAddress", "127.0.0.1")
        # Workers forked with mlflow, scikit-learn and pandas imported (see the module).
        builder = builder.config("spark.python.daemon.module", "pipelines.spark_daemon")
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # py4j and pyspark raise many types; all mean "no Spark"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot start Spark on {master}: {first}") from None
    session.sparkContext.setLogLevel("ERROR")
    return session
