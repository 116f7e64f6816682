"""The BentoML peer of the serving benchmark: one flowline model version behind BentoML.

Runs only in the benchmark's own venv (benchmarks/.bentoml-venv, BentoML 1.4.40); never a
flowline dependency. Adaptive batching on, one worker, as BentoML recommends for a CPU
model. The body is ``{"rows": [{column: value, ...}]}``; BentoML's batcher concatenates
the ``rows`` lists of concurrent requests into one call and splits the answers back.

    FLOWLINE_BENCH_MODEL=<model dir> bentoml serve bento_service:Scorer --port 3000
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import mlflow.pyfunc
import pandas as pd


@bentoml.service(workers=1)
class Scorer:
    """Loads the model version once; scores batches of raw rows."""

    def __init__(self) -> None:
        self.model = mlflow.pyfunc.load_model(os.environ["FLOWLINE_BENCH_MODEL"])

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=64, max_latency_ms=1000)
    def invocations(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Labels for the rows of every request in the batch."""
        predictions = self.model.predict(pd.DataFrame(rows))
        return [p.item() if hasattr(p, "item") else p for p in predictions]
