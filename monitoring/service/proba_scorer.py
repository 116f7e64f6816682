"""Class probabilities of captured rows, for performance estimation without labels.

The gateway captures what callers were answered: labels, for a classifier. CBPE needs
the model's probabilities, so the monitor asks the version itself, in a child process
(:mod:`monitoring.service.proba_worker`) per model version, started with a replica's
allowlisted environment: model code never runs in the monitor, next to its secrets.
A worker is started on first use, kept while it is used, and stopped when idle or
when the monitor stops; a version whose worker cannot start is retried later.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pandas as pd

from common.processes import replica_environment

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 180.0  # importing MLflow and loading a model, on a busy machine
SCORE_TIMEOUT_S = 120.0
IDLE_S = 900.0
RETRY_S = 300.0


class _Worker:
    """One child process and the thread that reads its answers."""

    def __init__(self, model_uri: str, tracking_uri: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "monitoring.service.proba_worker", model_uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=replica_environment(tracking_uri),
            text=True,
        )
        self.answers: queue.Queue[str | None] = queue.Queue()
        self.used = time.monotonic()
        threading.Thread(target=self._read, daemon=True, name="flowline-proba-reader").start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.answers.put(line)
        self.answers.put(None)  # the worker exited

    def next_answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no answer within {timeout:g} s") from None
        if line is None:
            raise RuntimeError(f"the worker exited with code {self.process.wait()}")
        return json.loads(line)

    def ask(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.used = time.monotonic()
        self.process.stdin.write(json.dumps(request, default=str) + "\n")
        self.process.stdin.flush()
        return self.next_answer(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ProbaScorer:
    """Scores rows of a model version for class probabilities, in sandboxed workers."""

    def __init__(self, tracking_uri: str = "") -> None:
        self.tracking_uri = tracking_uri
        self._workers: dict[tuple[str, str], _Worker] = {}
        self._failed: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def proba(
        self, model: str, version: str, frame: pd.DataFrame, classes: list[Any]
    ) -> np.ndarray | None:
        """The rows' probabilities with one column per class in ``classes`` order, or None
        when the version cannot answer them now (the reason is logged)."""
        if frame.empty:
            return None
        key = (model, version)
        with self._lock:
            if time.monotonic() < self._failed.get(key, 0.0):
                return None
            try:
                worker = self._worker(key)
                request = {"columns": [str(c) for c in frame.columns], "data": _rows(frame)}
                answer = worker.ask(request, SCORE_TIMEOUT_S)
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return _ordered(answer, classes)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                logger.warning("no probabilities for %s/%s: %s", model, version, exc)
                self._failed[key] = time.monotonic() + RETRY_S
                self._drop(key)
                return None

    def _worker(self, key: tuple[str, str]) -> _Worker:
        worker = self._workers.get(key)
        if worker is not None and worker.process.poll() is None:
            return worker
        worker = _Worker(f"models:/{key[0]}/{key[1]}", self.tracking_uri)
        self._workers[key] = worker
        ready = worker.next_answer(LOAD_TIMEOUT_S)
        if "error" in ready:
            raise RuntimeError(ready["error"])
        return worker

    def _drop(self, key: tuple[str, str]) -> None:
        worker = self._workers.pop(key, None)
        if worker is not None:
            worker.stop()

    def stop_idle(self, idle_s: float = IDLE_S) -> None:
        """Stop workers unused for ``idle_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, w in self._workers.items() if now - w.used > idle_s]:
                self._drop(key)

    def close(self) -> None:
        """Stop every worker."""
        with self._lock:
            for key in list(self._workers):
                self._drop(key)


def _rows(frame: pd.DataFrame) -> list[list[Any]]:
    # NaN is not JSON: a missing value goes as null, which the model reads as missing.
    return frame.astype(object).where(frame.notna(), None).values.tolist()


def _ordered(answer: dict[str, Any], classes: list[Any]) -> np.ndarray:
    proba = np.asarray(answer["proba"], dtype=float)
    columns = [str(c) for c in answer["classes"]]
    wanted = [str(c) for c in classes]
    if sorted(columns) != sorted(wanted) or proba.shape[1] != len(wanted):
        raise ValueError(f"the model answers classes {columns}, its baseline has {wanted}")
    return proba[:, [columns.index(c) for c in wanted]]
