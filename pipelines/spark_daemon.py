"""PySpark's worker daemon, with the heavy imports of a trial done once, before forking.

Spark forks every Python worker from this daemon (``spark.python.daemon.module``).
hyperopt's SparkTrials starts each trial from a new driver thread, and each new thread
gets a new worker, so with the stock daemon every trial imported mlflow, scikit-learn and
pandas again: about 4 s of a 1 s trial on 2 cores (measured with 10 trials of 0.5 s:
32 s). Imported here, they are shared copy-on-write by every forked worker. TensorFlow is
not imported here: it must not be initialised before a fork.

Set for local masters by pipelines.spark; on a cluster whose executors have flowline
installed, set ``spark.python.daemon.module=pipelines.spark_daemon`` the same way.
"""

import mlflow.pyfunc  # noqa: F401
import pandas  # noqa: F401
import sklearn.ensemble  # noqa: F401
import sklearn.linear_model  # noqa: F401
from pyspark import daemon

import pipelines.batch_score  # noqa: F401
import pipelines.train  # noqa: F401

if __name__ == "__main__":
    daemon.manager()
