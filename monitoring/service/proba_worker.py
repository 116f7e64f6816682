"""The probability scorer's child process: ``python -m monitoring.service.proba_worker URI``.

It loads one model version (``models:/name/version``) and answers, one JSON line per
JSON line on stdin, the class probabilities of the rows it is sent::

    in:  {"columns": ["age", ...], "data": [[41, ...], ...]}
    out: {"classes": ["0", "1"], "proba": [[0.2, 0.8], ...]}   or   {"error": "..."}

Model code runs here, in a process started with the allowlisted environment of a
replica (`common.processes.replica_environment`), never in the monitor: the monitor's
secrets (its token, database URL, webhooks) must not reach it.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO


def _answer(out: TextIO, payload: dict[str, Any]) -> None:
    out.write(json.dumps(payload, allow_nan=False) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    """Load the model named on the command line and serve requests until stdin closes."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(
            "usage: python -m monitoring.service.proba_worker models:/NAME/VERSION", file=sys.stderr
        )
        return 2
    # The protocol owns the original stdout; whatever the model or MLflow prints goes to
    # stderr, where it cannot corrupt an answer.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    import mlflow.pyfunc
    import pandas as pd

    try:
        model = mlflow.pyfunc.load_model(args[0])
    except Exception as exc:  # the parent logs the reason and retries later
        _answer(protocol, {"error": f"cannot load {args[0]}: {type(exc).__name__}: {exc}"})
        return 1
    _answer(protocol, {"ready": True})
    for line in sys.stdin:
        try:
            request = json.loads(line)
            frame = pd.DataFrame(request["data"], columns=request["columns"])
            proba = model.predict(frame, params={"predict_method": "predict_proba"})
            _answer(
                protocol,
                {"classes": [str(c) for c in proba.columns], "proba": proba.to_numpy().tolist()},
            )
        except Exception as exc:  # one bad window must not end the worker
            _answer(protocol, {"error": f"{type(exc).__name__}: {str(exc)[:500]}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
