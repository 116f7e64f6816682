"""Label feedback and realized performance, in-process: parsing and its refusals, the
idempotent store, late captures, realized metrics equal to scikit-learn's on the same
pairs, the HTTP API, gauges, the report, and the degraded alert once across a restart."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from monitoring.profile.baseline import build_profile
from monitoring.profile.performance import fit_calibration, performance_section
from monitoring.service.baselines import BaselineCache
from monitoring.service.feedback import (
    BadFeedback,
    FeedbackItem,
    WrongLabels,
    check_labels,
    parse_feedback,
    split_row_id,
)
from monitoring.service.monitor import Monitor
from monitoring.service.server import create_app
from monitoring.service.settings import MonitorSettings
from tests.helpers_monitor import CHURN, LoopbackServer, capture_records

NUMERIC = ["tenure_months", "monthly_charges", "total_charges", "support_calls", "senior"]
TOKEN = "feedback-t0ken"


@pytest.fixture(scope="module")
def churn_model() -> dict[str, Any]:
    """A classifier of the demo data, its baseline with a performance section, and 1,000
    unseen rows with their labels, predictions and probabilities."""
    data = pd.read_csv(CHURN)
    train, test, live = data.iloc[:1500], data.iloc[1500:2000], data.iloc[2000:3000]
    model = make_pipeline(SimpleImputer(), LogisticRegression(max_iter=1000))  # the data has nulls
    model.fit(train[NUMERIC], train["churned"])
    test_pred = model.predict(test[NUMERIC])
    scores = {
        "accuracy": float(skm.accuracy_score(test["churned"], test_pred)),
        "f1": float(skm.f1_score(test["churned"], test_pred, average="weighted")),
    }
    proba = model.predict_proba(test[NUMERIC])
    calibration = fit_calibration(model.classes_, proba, test["churned"])
    profile = build_profile(train[NUMERIC], model.predict(train[NUMERIC]))
    profile["performance"] = performance_section(
        "classification", "roc_auc", scores, len(test), list(model.classes_), calibration
    )
    return {
        "model": model,
        "profile": profile,
        "live": live[NUMERIC].reset_index(drop=True),
        "labels": live["churned"].tolist(),
        "predicted": model.predict(live[NUMERIC]).tolist(),
        "proba": model.predict_proba(live[NUMERIC]),
        "classes": list(model.classes_),
        "test": scores,
    }


def make_monitor(tmp_path: Path, profile: dict[str, Any], **settings: Any) -> Monitor:
    settings.setdefault("window_rows", 500)
    config = MonitorSettings(
        home=tmp_path, mlflow_enabled=False, estimate_enabled=False, **settings
    )
    return Monitor(config, baselines=BaselineCache(lambda m, v: profile), public_url="http://mon")


# --- parsing and types ------------------------------------------------------------------


def test_row_ids_name_a_request_and_a_row() -> None:
    assert split_row_id("9f3a01bc-2a") == ("9f3a01bc-2a", 0)
    assert split_row_id("9f3a01bc-2a:17") == ("9f3a01bc-2a", 17)
    for bad in ("", "x:-1", "x:", ":3", "x:1e3", 7, None, "a\x00b", "x" * 200):
        with pytest.raises(BadFeedback):
            split_row_id(bad)


def test_json_and_csv_bodies_parse_to_the_same_labels() -> None:
    from_json = parse_feedback(
        b'[{"request_id": "a-1", "label": "yes"}, {"request_id": "a-2:3", "label": "no"}]',
        "application/json",
    )
    from_csv = parse_feedback(
        b"\xef\xbb\xbfrequest_id,label\r\na-1,yes\r\na-2:3,no\r\n", "text/csv"
    )
    assert from_json == from_csv == [FeedbackItem("a-1", 0, "yes"), FeedbackItem("a-2", 3, "no")]
    curl_default = parse_feedback(
        b'[{"request_id": "a-1", "label": "yes"}]', "application/x-www-form-urlencoded"
    )
    assert curl_default == from_json[:1]  # curl -d's type, with the JSON the user typed
    extra_column = parse_feedback(b"label,note,request_id\n1,late,r-9\n", "text/csv; charset=utf-8")
    assert extra_column == [FeedbackItem("r-9", 0, "1")]


@pytest.mark.parametrize(
    ("body", "content_type", "says"),
    [
        (b"not json", "application/json", "not valid JSON"),
        (b'{"request_id": "a", "label": 1}', "application/json", "JSON list"),
        (b"[]", "application/json", "no labels"),
        (b'[{"request_id": "a"}]', "application/json", "'request_id' and 'label'"),
        (b'[{"request_id": "a", "label": null}]', None, "string, number or boolean"),
        (b'[{"request_id": "a", "label": [1]}]', None, "string, number or boolean"),
        (b'[{"request_id": 5, "label": 1}]', None, "request_id must be"),
        (b"id,value\na,1\n", "text/csv", "request_id and label"),
        (b"request_id,label\na,1,2\n", "text/csv", "has 3 fields"),
        (b"request_id,label\na,\n", "text/csv", "empty label"),
        (b"request_id,label\n\xff,1\n", "text/csv", "not UTF-8"),
        (b"<xml/>", "application/xml", "unsupported Content-Type"),
    ],
)
def test_malformed_bodies_are_refused_with_a_clear_reason(
    body: bytes, content_type: str | None, says: str
) -> None:
    with pytest.raises(BadFeedback, match=says):
        parse_feedback(body, content_type)


def test_labels_take_the_models_type_or_are_refused() -> None:
    items = [FeedbackItem("a", 0, v) for v in (1, "0", 1.0, "1")]
    assert [i.label for i in check_labels(items, "classification", [0, 1])] == [1, 0, 1, 1]
    booleans = [FeedbackItem("a", 0, v) for v in ("true", False, 1, "no")]
    assert [i.label for i in check_labels(booleans, "classification", [False, True])] == [
        True, False, True, False,
    ]  # fmt: skip
    strings = [FeedbackItem("a", 0, v) for v in ("yes", 1, 2.0)]
    assert [i.label for i in check_labels(strings, "classification", ["no", "yes"])] == [
        "yes", "1", "2",
    ]  # fmt: skip
    assert [i.label for i in check_labels([FeedbackItem("a", 0, "3.5")], "regression", None)] == [
        3.5
    ]
    with pytest.raises(WrongLabels, match="not an integer class"):
        check_labels(
            [FeedbackItem("a", 0, "yes"), FeedbackItem("b", 0, 1.5)], "classification", [0, 1]
        )
    with pytest.raises(WrongLabels, match="not a number"):
        check_labels([FeedbackItem("a", 0, "cat"), FeedbackItem("b", 0, True)], "regression", None)
    with pytest.raises(WrongLabels, match="not a boolean"):
        check_labels([FeedbackItem("a", 0, "maybe")], "classification", [False, True])
    assert check_labels(items, None, None) == items  # an old baseline: kept as they came


# --- the store and realized performance ----------------------------------------------------


def test_feedback_for_1000_captured_requests_gives_sklearns_accuracy_and_is_idempotent(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    monitor = make_monitor(tmp_path, churn_model["profile"])
    recs, row_ids = capture_records(churn_model["live"], churn_model["predicted"])
    assert monitor.ingest(recs).rows == 1000
    labels = churn_model["labels"]
    body = json.dumps([{"request_id": r, "label": y} for r, y in zip(row_ids, labels, strict=True)])
    first = monitor.feedback_body("churn", body.encode(), "application/json")
    assert (first.received, first.new, first.matched, first.unknown) == (1000, 1000, 1000, 0)
    again = monitor.feedback_body("churn", body.encode(), "application/json")
    assert (again.new, again.updated, again.unchanged) == (0, 0, 1000)
    monitor.refresh_performance()
    view = monitor.performance_view("churn")
    [version] = view["versions"]
    expected = skm.accuracy_score(labels, churn_model["predicted"])
    assert version["labelled_rows"] == 1000
    assert version["realized"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert version["realized"]["f1"] == pytest.approx(
        skm.f1_score(labels, churn_model["predicted"], average="weighted"), abs=1e-12
    )
    assert "roc_auc" not in version["realized"]  # labels were captured, not probabilities
    assert version["test"] == pytest.approx(churn_model["test"])
    assert view["labels"] == {"matched": 1000, "unknown": 0}
    # A correction days later replaces the label; resending it again changes nothing.
    flipped = "no" if labels[0] == "yes" else "yes"
    fix = json.dumps([{"request_id": row_ids[0], "label": flipped}]).encode()
    later = monitor.feedback.add("churn", parse_feedback(fix, None), now=time.time() + 5 * 86400)
    assert (later.updated, later.new) == (1, 0)
    assert monitor.feedback_body("churn", fix, None).unchanged == 1
    monitor.refresh_performance()
    corrected = [flipped, *labels[1:]]
    realized = monitor.performance_view("churn")["versions"][0]["realized"]
    assert realized["accuracy"] == pytest.approx(
        skm.accuracy_score(corrected, churn_model["predicted"]), abs=1e-12
    )


def test_rows_of_a_batch_request_and_probabilities_give_per_row_labels_and_roc_auc(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    classes = churn_model["classes"]
    answers = [dict(zip(classes, row, strict=True)) for row in churn_model["proba"].tolist()]
    monitor = make_monitor(tmp_path, churn_model["profile"])
    recs, row_ids = capture_records(churn_model["live"], answers, per=50)
    monitor.ingest(recs)
    labels = churn_model["labels"]
    csv = "request_id,label\n" + "".join(f"{r},{y}\n" for r, y in zip(row_ids, labels, strict=True))
    assert monitor.feedback_body("churn", csv.encode(), "text/csv").matched == 1000
    monitor.refresh_performance()
    realized = monitor.performance_view("churn")["versions"][0]["realized"]
    proba = churn_model["proba"]
    assert realized["accuracy"] == pytest.approx(
        skm.accuracy_score(labels, np.asarray(classes)[proba.argmax(axis=1)]), abs=1e-12
    )
    positive = np.asarray(labels) == classes[1]
    assert realized["roc_auc"] == pytest.approx(skm.roc_auc_score(positive, proba[:, 1]), abs=1e-12)


def test_labels_before_their_capture_are_counted_unknown_kept_and_joined_later(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    monitor = make_monitor(tmp_path, churn_model["profile"])
    recs, row_ids = capture_records(churn_model["live"].iloc[:100], churn_model["predicted"][:100])
    labels = churn_model["labels"][:100]
    early = [{"request_id": r, "label": y} for r, y in zip(row_ids, labels, strict=True)]
    wrong = [{"request_id": "never-captured", "label": "no"}]
    result = monitor.feedback_body("churn", json.dumps(early + wrong).encode(), None)
    assert (result.new, result.unknown, result.matched) == (101, 101, 0)
    monitor.ingest(recs)  # the capture arrives after its labels
    monitor.refresh_performance()
    view = monitor.performance_view("churn")
    assert view["labels"] == {"matched": 100, "unknown": 1}
    assert view["versions"][0]["realized"]["accuracy"] == pytest.approx(
        skm.accuracy_score(labels, churn_model["predicted"][:100]), abs=1e-12
    )


def test_labels_are_assigned_to_the_window_of_their_request(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    monitor = make_monitor(tmp_path, churn_model["profile"], window_rows=400)
    recs, row_ids = capture_records(churn_model["live"], churn_model["predicted"])
    monitor.ingest(recs)
    assert [w.rows for w in monitor.close_windows()] == [400, 400]  # 200 rows still open
    body = [
        {"request_id": r, "label": y} for r, y in zip(row_ids, churn_model["labels"], strict=True)
    ]
    monitor.feedback_body("churn", json.dumps(body).encode(), None)
    monitor.refresh_performance()
    windows = monitor.performance_view("churn")["versions"][0]["windows"]
    assert [(w["window_index"], w["labelled_rows"]) for w in windows] == [
        (0, 400),
        (1, 400),
        ("open", 200),
    ]
    labels, predicted = churn_model["labels"], churn_model["predicted"]
    for w, (lo, hi) in zip(windows, [(0, 400), (400, 800), (800, 1000)], strict=True):
        assert w["realized"]["accuracy"] == pytest.approx(
            skm.accuracy_score(labels[lo:hi], predicted[lo:hi]), abs=1e-12
        )
    window_id = windows[1]["window_id"]
    page = monitor.report_html("churn", window_id)
    assert "<h2>Performance</h2>" in page and "400 labelled rows" in page


def test_a_degraded_version_alerts_once_and_not_again_after_a_restart(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    hook = LoopbackServer()
    try:
        settings = {"alert_webhooks": (hook.url,), "performance_min_rows": 100}
        monitor = make_monitor(tmp_path, churn_model["profile"], **settings)
        recs, row_ids = capture_records(churn_model["live"], churn_model["predicted"])
        monitor.ingest(recs)
        # Every label the opposite of the prediction: realized accuracy 0.
        flipped = ["no" if p == "yes" else "yes" for p in churn_model["predicted"]]
        body = [{"request_id": r, "label": y} for r, y in zip(row_ids, flipped, strict=True)]
        monitor.feedback_body("churn", json.dumps(body).encode(), None)
        monitor.refresh_performance()
        assert monitor.alerts.deliver_due() == 1
        [(path, sent)] = hook.received
        alert = json.loads(sent)
        assert alert["event"] == "performance_degraded" and alert["metric"] == "accuracy"
        assert alert["realized"] == 0.0 and alert["test"] == pytest.approx(
            churn_model["test"]["accuracy"]
        )
        assert monitor.performance_view("churn")["versions"][0]["degraded"] is True
        monitor.stop()
        restarted = make_monitor(tmp_path, churn_model["profile"], **settings)
        restarted.refresh_performance()
        assert restarted.alerts.deliver_due() == 0 and len(hook.received) == 1
        restarted.stop()
    finally:
        hook.stop()


def test_http_feedback_and_performance(tmp_path: Path, churn_model: dict[str, Any]) -> None:
    monitor = make_monitor(tmp_path, churn_model["profile"])
    recs, row_ids = capture_records(churn_model["live"].iloc[:60], churn_model["predicted"][:60])
    monitor.ingest(recs)

    async def scenario() -> None:
        app = create_app(monitor, manage_threads=False, ingest_token="i", feedback_token=TOKEN)
        transport = httpx.ASGITransport(app=app)
        auth = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://mon") as api:
            good = [{"request_id": r, "label": "no"} for r in row_ids]
            refused = await api.post("/feedback/churn", json=good)
            assert refused.status_code == 401 and "token" in refused.json()["error"]
            ingest_key = await api.post(
                "/feedback/churn", json=good, headers={"authorization": "Bearer i"}
            )
            assert ingest_key.status_code == 401  # the capture token does not send labels
            answer = await api.post("/feedback/churn", json=good, headers=auth)
            assert answer.status_code == 200 and answer.json()["new"] == 60
            bad = await api.post("/feedback/churn", content=b"{", headers=auth)
            assert bad.status_code == 400 and "JSON" in bad.json()["error"]
            wrong = await api.post(
                "/feedback/churn", json=[{"request_id": row_ids[0], "label": 3.5}], headers=auth
            )
            assert wrong.status_code == 200  # 3.5 is the string class "3.5": right type
            await asyncio.to_thread(monitor.refresh_performance)
            view = await api.get("/performance/churn")
            assert view.status_code == 200 and view.json()["versions"][0]["labelled_rows"] == 60
            assert view.json()["feedback_url"] == "http://mon/feedback/churn"
            assert (await api.get("/performance/nobody")).status_code == 404
            text = (await api.get("/metrics")).text
            assert (
                'flowline_monitor_feedback_labels_total{model="churn",outcome="new"} 60.0' in text
            )
            assert 'flowline_monitor_labelled_rows{model="churn",version="1"} 60.0' in text
            assert (
                'flowline_monitor_realized_performance{metric="accuracy",model="churn",version="1"}'
                in text
            )

    asyncio.run(scenario())


def test_labels_of_the_wrong_type_get_422(tmp_path: Path, churn_model: dict[str, Any]) -> None:
    profile = json.loads(json.dumps(churn_model["profile"]))
    profile["performance"]["task"] = "regression"
    monitor = make_monitor(tmp_path, profile)
    recs, row_ids = capture_records(churn_model["live"].iloc[:5], [0.5] * 5)
    monitor.ingest(recs)

    async def scenario() -> None:
        app = create_app(monitor, manage_threads=False, feedback_token=TOKEN)
        transport = httpx.ASGITransport(app=app)
        auth = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://mon") as api:
            wrong = await api.post(
                "/feedback/churn", json=[{"request_id": row_ids[0], "label": "cat"}], headers=auth
            )
            assert wrong.status_code == 422 and "not a number" in wrong.json()["error"]
            assert monitor.feedback.counts("churn") == {"matched": 0, "unknown": 0}  # none stored

    asyncio.run(scenario())


def test_a_closing_window_of_a_classifier_is_estimated_from_captured_probabilities(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    classes = churn_model["classes"]
    answers = [dict(zip(classes, row, strict=True)) for row in churn_model["proba"].tolist()]
    monitor = make_monitor(tmp_path, churn_model["profile"])
    monitor.ingest(capture_records(churn_model["live"], answers, per=20)[0])
    assert len(monitor.close_windows()) == 2
    spans = monitor.store.window_spans("churn", "1")
    for span, (lo, hi) in zip(spans, [(0, 500), (500, 1000)], strict=True):
        estimate = span.estimate
        assert estimate["method"] == "cbpe" and estimate["probabilities"] == "captured"
        assert estimate["rows"] == 500
        # Within CBPE's error of the accuracy the labels give (test_cbpe.py bounds it).
        realized = skm.accuracy_score(
            churn_model["labels"][lo:hi], np.asarray(classes)[churn_model["proba"][lo:hi].argmax(1)]
        )
        assert abs(estimate["accuracy"] - realized) < 0.06
        assert 0.5 < estimate["roc_auc"] <= 1.0
    latest = monitor.performance_view("churn")["versions"][0]["estimated"]
    assert latest["window_index"] == 1 and latest["accuracy"] == spans[1].estimate["accuracy"]
    page = monitor.report_html("churn", spans[0].id)
    assert "estimated (CBPE, no labels)" in page and "the callers were answered" in page


def test_without_a_calibration_or_probabilities_nothing_is_estimated(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    monitor = make_monitor(tmp_path, churn_model["profile"])  # no scorer: estimate_enabled off
    monitor.ingest(capture_records(churn_model["live"], churn_model["predicted"], per=20)[0])
    monitor.close_windows()
    assert [s.estimate for s in monitor.store.window_spans("churn", "1")] == [None, None]


class RowScorer:
    """Stands in for the sandboxed worker: the test's own model scores the window's rows."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, 0

    def proba(self, model: str, version: str, frame: pd.DataFrame, classes: list) -> np.ndarray:
        self.calls += 1
        return self.model.predict_proba(frame[NUMERIC].apply(pd.to_numeric))

    def stop_idle(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_windows_without_captured_probabilities_are_estimated_later_off_the_detector(
    tmp_path: Path, churn_model: dict[str, Any]
) -> None:
    monitor = make_monitor(tmp_path, churn_model["profile"])
    scorer = RowScorer(churn_model["model"])
    monitor.scorer = scorer
    monitor.ingest(capture_records(churn_model["live"], churn_model["predicted"], per=20)[0])
    assert len(monitor.close_windows()) == 2 and scorer.calls == 0  # drift does not wait
    assert [s.estimate for s in monitor.store.window_spans("churn", "1")] == [None, None]
    monitor.refresh_performance()
    spans = monitor.store.window_spans("churn", "1")
    assert scorer.calls == 2 and all(s.estimate["probabilities"] == "scored" for s in spans)
    labels, proba = churn_model["labels"], churn_model["proba"]
    for span, (lo, hi) in zip(spans, [(0, 500), (500, 1000)], strict=True):
        predicted = np.asarray(churn_model["classes"])[proba[lo:hi].argmax(1)]
        assert abs(span.estimate["accuracy"] - skm.accuracy_score(labels[lo:hi], predicted)) < 0.06
    monitor.refresh_performance()
    assert scorer.calls == 2  # estimated once
    assert "the version scored for this window" in monitor.report_html("churn", spans[0].id)
