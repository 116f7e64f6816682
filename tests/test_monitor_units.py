"""The monitor in-process: windows, drift on the right features, schema violations,
alerts with retries and no repeat after a restart, the HTML report, the HTTP API."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from starlette.requests import Request

from monitoring.profile.baseline import ProfileError, build_profile
from monitoring.service.baselines import BaselineCache
from monitoring.service.monitor import Monitor
from monitoring.service.server import MAX_INGEST_BYTES, MonitorEndpoints, create_app
from monitoring.service.settings import MonitorSettings
from tests.helpers_monitor import CHURN, FEATURES, LoopbackServer, capture_records, shifted

WINDOW = 200


@pytest.fixture(scope="module")
def churn() -> tuple[pd.DataFrame, dict[str, Any]]:
    """The demo data and a baseline built from its first 2400 rows (labels as predictions)."""
    data = pd.read_csv(CHURN)
    train = data.iloc[:2400]
    return data, build_profile(train[FEATURES], train["churned"].to_numpy())


def make_monitor(tmp_path: Path, profile: dict[str, Any] | None, **settings: Any) -> Monitor:
    settings.setdefault("window_rows", WINDOW)
    config = MonitorSettings(home=tmp_path, mlflow_enabled=False, **settings)

    def fetch(model: str, version: str) -> dict[str, Any]:
        if profile is None:
            raise ProfileError("no baseline in this test")
        return profile

    return Monitor(config, baselines=BaselineCache(fetch), public_url="http://mon")


def records(
    frame: pd.DataFrame, predictions: list[Any], model: str = "churn", per: int = 20
) -> list[dict]:
    """Capture records of dataframe_split requests, ``per`` rows each."""
    return capture_records(frame, predictions, per, model)[0]


def sample(data: pd.DataFrame, n: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    rows = data.iloc[:2400].sample(n, random_state=seed)
    return rows[FEATURES].reset_index(drop=True), rows["churned"].tolist()


def test_training_traffic_does_not_drift_and_shifted_traffic_drifts_on_the_right_features(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile)
    normal, labels = sample(data, 2 * WINDOW, seed=1)
    monitor.ingest(records(normal, labels))
    calm = monitor.close_windows()
    assert [w.drifted for w in calm] == [False, False], [w.reasons for w in calm]

    moved, labels = sample(data, 2 * WINDOW, seed=2)
    monitor.ingest(records(shifted(moved), labels))
    drifted = monitor.close_windows()
    assert [w.window_index for w in drifted] == [2, 3]
    for w in drifted:
        assert w.drifted
        assert {"tenure_months", "contract"} <= set(w.drifted_features)
        assert not set(w.drifted_features) & {"monthly_charges", "internet_service", "senior"}
    view = monitor.drift_view("churn")
    assert view["drifted"] and view["rows_captured"] == 4 * WINDOW
    assert [w["window_index"] for w in view["windows"]] == [3, 2, 1, 0]
    assert view["latest"]["report_url"] == f"http://mon/reports/churn/{drifted[-1].id}"


def test_windows_close_by_rows_and_by_time(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile, window_seconds=60.0)
    frame, labels = sample(data, 2 * WINDOW + 50, seed=3)
    monitor.ingest(records(frame, labels, per=25))
    closed = monitor.close_windows()
    assert [(w.rows, w.closed_by) for w in closed] == [(WINDOW, "rows"), (WINDOW, "rows")]
    ingested = monitor.store.pending("churn", "1", closed[-1].last_record_id, 1)[0].ingested_at
    assert monitor.close_windows(now=ingested + 30) == []  # 50 rows, not old enough
    [late] = monitor.close_windows(now=ingested + 61)
    assert (late.rows, late.closed_by, late.window_index) == (50, "time", 2)
    assert monitor.close_windows(now=ingested + 1000) == []


def test_schema_violations_are_counted_and_the_rest_of_the_window_is_evaluated(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile)
    frame, labels = sample(data, WINDOW - 10, seed=4)
    good = records(frame, labels)
    odd = [
        {"id": "b1", "model": "churn", "version": "1", "time": 1.8e9, "body": "{oops",
         "content_type": "application/json"},
        {"id": "b2", "model": "churn", "version": "1", "time": 1.8e9,
         "inputs": [[1, 2, 3], "scalar row"]},
        {"id": "b3", "model": "churn", "version": "1", "time": 1.8e9,
         "inputs": [{**frame.iloc[0].to_dict(), "tenure_months": "lots", "debug": 1}] * 4},
        {"id": "b4", "model": "churn", "version": "1", "time": 1.8e9,
         "inputs": [{k: v for k, v in frame.iloc[1].to_dict().items() if k != "senior"}] * 3},
    ]  # fmt: skip
    monitor.ingest(good + odd)
    [w] = monitor.close_windows()
    assert w.rows == WINDOW  # 190 good + 1 unreadable body + 2 bad rows + 4 + 3
    _, stored = monitor.store.window(w.id)
    violations = stored["violations"]
    assert violations == {
        "malformed_row": 1 + 2 + 0,  # the unreadable body, the list row and the scalar row
        "missing_value": 3,
        "extra_value": 4,
        "invalid_value": 4,
    }
    drift = stored["drift"]
    assert drift["schema"]["extra"] == ["debug"] and drift["schema"]["invalid_values"] == {
        "tenure_months": 4
    }
    assert w.drifted and "schema:invalid:tenure_months" in w.reasons
    assert drift["features"]["monthly_charges"]["distribution"] is not None  # still tested
    metrics = scrape(monitor)
    assert metrics[("flowline_monitor_schema_violations_total", "extra_value")] == 4
    assert metrics[("flowline_monitor_schema_violations_total", "malformed_row")] == 3


def test_positional_rows_are_mapped_onto_the_baseline_columns(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile)
    frame, labels = sample(data, WINDOW, seed=5)
    instances = json.loads(frame.to_json(orient="values"))
    monitor.ingest([
        {"id": f"p{i}", "model": "churn", "version": "1", "time": 1.8e9,
         "body": json.dumps({"instances": instances[i : i + 50]}),
         "predictions": labels[i : i + 50]}
        for i in range(0, WINDOW, 50)
    ])  # fmt: skip
    [w] = monitor.close_windows()
    _, stored = monitor.store.window(w.id)
    assert stored["drift"]["schema"] == {
        "missing": [], "extra": [], "invalid_values": {}, "violated": False,
    }  # fmt: skip
    assert stored["violations"]["missing_value"] == 0


def test_rows_wait_while_the_baseline_is_unavailable(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, None)
    frame, labels = sample(data, WINDOW, seed=6)
    monitor.ingest(records(frame, labels))
    assert monitor.close_windows() == []
    assert scrape(monitor)[("flowline_monitor_baseline_missing", None)] == 1
    assert monitor.drift_view("churn")["versions"][0]["baseline_problem"]
    # The same store with a baseline that can now be fetched (a restart, say) evaluates them.
    later = Monitor(monitor.settings, store=monitor.store,
                    baselines=BaselineCache(lambda m, v: profile))  # fmt: skip
    [w] = later.close_windows()
    assert w.rows == WINDOW and w.window_index == 0


def test_alerts_fire_once_per_state_change_retry_and_survive_a_restart(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    failures = {"left": 2}

    def flaky(path: str, body: bytes) -> int:
        if failures["left"]:
            failures["left"] -= 1
            return 503
        return 200

    receiver = LoopbackServer(flaky)
    slack = LoopbackServer()
    try:
        settings = dict(
            alert_webhooks=(receiver.url + "/hook",), alert_backoff_s=0.0, alert_max_attempts=5
        )
        monitor = make_monitor(tmp_path, profile, **settings)
        moved, labels = sample(data, 2 * WINDOW, seed=7)
        monitor.ingest(records(shifted(moved), labels))
        assert [w.drifted for w in monitor.close_windows()] == [True, True]
        for _ in range(3):  # two failed attempts, then delivered
            monitor.alerts.deliver_due()
        [started] = receiver.bodies()
        assert started["event"] == "drift_started" and started["window_index"] == 0
        assert "tenure_months" in started["drifted_features"]
        assert started["report_url"].startswith("http://mon/reports/churn/")
        assert monitor.store.alert_log("churn")[0]["attempts"] == 3

        # A restart while drifted: more drifted windows raise nothing new.
        restarted = make_monitor(tmp_path, profile, **settings)
        more, labels = sample(data, WINDOW, seed=8)
        restarted.ingest(records(shifted(more), labels))
        assert [w.drifted for w in restarted.close_windows()] == [True]
        calm, labels = sample(data, WINDOW, seed=9)
        restarted.ingest(records(calm, labels))
        assert [w.drifted for w in restarted.close_windows()] == [False]
        restarted.alerts.deliver_due()
        restarted.alerts.deliver_due()
        assert [b["event"] for b in receiver.bodies()] == ["drift_started", "drift_ended"]

        # Slack format: {"text": ...}
        other = make_monitor(tmp_path / "slack", profile, alert_webhooks=(slack.url,),
                             alert_format="slack")  # fmt: skip
        other.ingest(records(shifted(moved), labels, model="fraud"))
        other.close_windows()
        other.alerts.deliver_due()
        [message] = slack.bodies()
        assert set(message) == {"text"} and "Drift started on *fraud* v1" in message["text"]
    finally:
        receiver.stop()
        slack.stop()


def test_alert_delivery_gives_up_after_max_attempts(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    down = LoopbackServer(lambda path, body: 500)
    try:
        monitor = make_monitor(tmp_path, profile, alert_webhooks=(down.url,), alert_backoff_s=0.0,
                               alert_max_attempts=3)  # fmt: skip
        moved, labels = sample(data, WINDOW, seed=10)
        monitor.ingest(records(shifted(moved), labels))
        monitor.close_windows()
        for _ in range(5):
            monitor.alerts.deliver_due()
        [entry] = monitor.store.alert_log("churn")
        assert entry["attempts"] == 3 and entry["failed_at"] and entry["last_error"] == "HTTP 500"
    finally:
        down.stop()


def test_the_html_report_is_self_contained_and_puts_drifted_features_first(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile)
    moved, labels = sample(data, WINDOW, seed=11)
    monitor.ingest(records(shifted(moved), labels))
    [w] = monitor.close_windows()
    page = monitor.report_html("churn", w.id)
    assert page is not None and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # nothing fetched
    assert "<script" not in page and "@import" not in page
    assert page.count("<svg") == len(FEATURES) + 1  # every feature and the prediction
    cards = re.findall(r'<div class="card( drifted)?"><h3>([^<]+)</h3>', page)
    drifted_flags = [bool(flag) for flag, _ in cards]
    assert drifted_flags == sorted(drifted_flags, reverse=True)  # drifted cards first
    assert {"tenure_months — drift", "contract — drift"} <= {title for _, title in cards}
    _, stored = monitor.store.window(w.id)
    contract = stored["plots"]["contract"]
    live = dict(zip(contract["bins"], contract["live"], strict=True))
    assert live["month-to-month"] == pytest.approx(1.0)
    tenure = stored["plots"]["tenure_months"]
    assert np.isclose(sum(tenure["baseline"]), 1.0) and np.isclose(sum(tenure["live"]), 1.0)
    assert monitor.report_html("other-model", w.id) is None


def scrape(monitor: Monitor) -> dict[tuple[str, str | None], float]:
    """Samples of the monitor's registry keyed by (name, kind label)."""
    from prometheus_client import generate_latest

    out: dict[tuple[str, str | None], float] = {}
    for family in text_string_to_metric_families(
        generate_latest(monitor.metrics.registry).decode()
    ):
        for s in family.samples:
            out[(s.name, s.labels.get("kind") or s.labels.get("feature"))] = s.value
    return out


def test_http_api(tmp_path: Path, churn: tuple[pd.DataFrame, dict]) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile)
    moved, labels = sample(data, WINDOW, seed=12)
    body = {"client": {"id": "c", "dropped": []}, "records": records(shifted(moved), labels)}

    async def scenario() -> None:
        app = create_app(monitor, manage_threads=False, ingest_token="t0ken")
        transport = httpx.ASGITransport(app=app)
        auth = {"authorization": "Bearer t0ken"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://mon", headers=auth
        ) as api:
            assert (await api.get("/health")).json() == {"status": "ok"}
            answer = await api.post("/ingest", json=body)
            assert answer.status_code == 200 and answer.json()["rows"] == WINDOW
            again = await api.post("/ingest", json=body)
            assert again.json()["duplicates"] == len(body["records"])
            assert (await api.post("/ingest", content=b"nope")).status_code == 400
            assert (await api.post("/ingest", json={"records": 3})).status_code == 400
            [w] = await asyncio.to_thread(monitor.close_windows)
            view = (await api.get("/drift/churn")).json()
            assert view["versions"][0]["rows_captured"] == WINDOW
            assert view["versions"][0]["rows_dropped"] == 0 and view["drifted"]
            assert view["windows"][0]["window_id"] == w.id
            models = (await api.get("/drift")).json()["models"]
            assert [m["model"] for m in models] == ["churn"]
            detail = (await api.get(f"/drift/churn/windows/{w.id}")).json()
            assert detail["report"]["drift"]["drifted"] is True
            page = await api.get(f"/reports/churn/{w.id}")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert (await api.get("/reports/churn/999999")).status_code == 404
            assert (await api.get("/drift/nobody")).status_code == 404
            text = (await api.get("/metrics")).text
            assert 'flowline_monitor_rows_captured_total{model="churn",version="1"} 200.0' in text
            assert 'flowline_monitor_rows_dropped_total{model="churn",version="1"} 0.0' in text
            assert 'flowline_monitor_dataset_drift{model="churn",version="1"} 1.0' in text
            assert re.search(
                r'flowline_monitor_feature_drifted\{feature="tenure_months",model="churn",'
                r'version="1"\} 1\.0', text
            )  # fmt: skip
            assert 'flowline_monitor_window_rows{model="churn",version="1"} 200.0' in text

    asyncio.run(scenario())


def test_settings_from_the_environment(tmp_path: Path) -> None:
    settings = MonitorSettings.from_env({
        "FLOWLINE_HOME": str(tmp_path), "FLOWLINE_WINDOW_ROWS": "250",
        "FLOWLINE_WINDOW_SECONDS": "30", "FLOWLINE_MONITOR_RETENTION_DAYS": "7",
        "FLOWLINE_ALERT_WEBHOOKS": "http://a/x, http://b/y", "FLOWLINE_ALERT_FORMAT": "slack",
    })  # fmt: skip
    assert (settings.window_rows, settings.window_seconds, settings.retention_days) == (250, 30, 7)
    assert settings.alert_webhooks == ("http://a/x", "http://b/y")
    assert settings.store_url == f"sqlite:///{tmp_path.resolve() / 'monitor.db'}"
    with pytest.raises(ValueError):
        MonitorSettings.from_env({"FLOWLINE_ALERT_FORMAT": "xml"})


def test_retention_runs_with_the_configured_days(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile, retention_days=1.0)
    frame, labels = sample(data, 40, seed=13)
    monitor.ingest(records(frame, labels))
    assert monitor.apply_retention(now=1.8e9 + 0.5 * 86400)["records"] == 0
    assert monitor.store.row_count("churn") == 40
    assert monitor.apply_retention(now=1.8e9 + 2 * 86400)["records"] == 2  # 20 rows each
    assert monitor.store.row_count("churn") == 0


def test_a_window_of_only_unreadable_records_is_still_closed_and_reported(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    _, profile = churn
    monitor = make_monitor(tmp_path, profile, window_seconds=10.0)
    junk = [
        {"id": f"j{i}", "model": "churn", "version": "1", "time": 1.8e9, "body": "%%%"}
        for i in range(5)
    ]
    assert monitor.ingest(junk).malformed_records == 5
    oldest = monitor.store.pending("churn", "1", 0, 10)[0].ingested_at
    [w] = monitor.close_windows(now=oldest + 11)
    assert (w.rows, w.closed_by, w.drifted) == (5, "time", True)
    assert "schema:missing:tenure_months" in w.reasons
    _, stored = monitor.store.window(w.id)
    assert stored["violations"]["malformed_row"] == 5
    assert stored["error_examples"][0] == "body is not valid JSON"
    assert monitor.report_html("churn", w.id) is not None


# --- the endpoint handlers alone (no app, no transport) -----------------------------------


def bare_request(
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    path_params: dict[str, Any] | None = None,
    query: bytes = b"",
) -> Request:
    """A Starlette request for calling one MonitorEndpoints method directly."""
    scope = {
        "type": "http",
        "method": method,
        "path": "/",
        "query_string": query,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "path_params": path_params or {},
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def test_the_ingest_handler_checks_the_token_and_the_size_before_the_body(
    tmp_path: Path, churn: tuple[pd.DataFrame, dict]
) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile)
    frame, labels = sample(data, 40, seed=14)
    batch = json.dumps({"records": records(frame, labels)}).encode()
    api = MonitorEndpoints(monitor, ingest_token="t0ken")
    auth = {"authorization": "Bearer t0ken"}

    async def scenario() -> None:
        for headers in ({}, {"authorization": "Bearer nope"}):
            refused = await api.ingest(bare_request("POST", headers, batch))
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == 'Bearer realm="flowline-monitor"'
        too_big = {**auth, "content-length": str(MAX_INGEST_BYTES + 1)}
        assert (await api.ingest(bare_request("POST", too_big, b"{}"))).status_code == 413
        bad = await api.ingest(bare_request("POST", auth, b"nope"))
        assert bad.status_code == 400
        assert json.loads(bad.body) == {"error": "body is not valid JSON"}
        stored = await api.ingest(bare_request("POST", auth, batch))
        assert stored.status_code == 200 and json.loads(stored.body)["rows"] == 40
        # Without a token the monitor accepts nothing, not even an empty bearer.
        closed = MonitorEndpoints(monitor)
        empty = {"authorization": "Bearer "}
        assert (await closed.ingest(bare_request("POST", empty, batch))).status_code == 401

    asyncio.run(scenario())
    assert monitor.store.row_count("churn") == 40


def test_the_read_handlers_alone(tmp_path: Path, churn: tuple[pd.DataFrame, dict]) -> None:
    data, profile = churn
    monitor = make_monitor(tmp_path, profile)
    api = MonitorEndpoints(monitor)
    odd = 'a<b>"&'

    async def scenario() -> None:
        empty = await api.index(bare_request())
        assert "<li>no traffic yet</li>" in empty.body.decode()
        frame, labels = sample(data, WINDOW, seed=15)
        monitor.ingest(records(frame, labels) + records(frame.iloc[:20], labels, model=odd))
        [w] = await asyncio.to_thread(monitor.close_windows)
        page = (await api.index(bare_request())).body.decode()
        verdict = "<b>drift</b>" if w.drifted else "no drift"
        assert f'<li><a href="http://mon/drift/churn">churn</a>: {verdict} (v1)</li>' in page
        assert "a&lt;b&gt;&#34;&amp;</a>" in page and odd not in page  # escaped
        churn_only = {"model": "churn"}
        limit = await api.drift_model(bare_request(path_params=churn_only, query=b"limit=x"))
        assert limit.status_code == 400
        view = await api.drift_model(bare_request(path_params=churn_only, query=b"limit=1"))
        assert [v["window_id"] for v in json.loads(view.body)["windows"]] == [w.id]
        params = {"model": "churn", "window_id": w.id}
        report = await api.report(bare_request(path_params=params))
        assert report.status_code == 200 and report.body.startswith(b"<!DOCTYPE html>")
        missing = await api.report(bare_request(path_params={"model": odd, "window_id": w.id}))
        assert missing.status_code == 404
        assert missing.body.decode() == f"<p>No window {w.id} for model a&lt;b&gt;&#34;&amp;.</p>"
        window = await api.window_json(bare_request(path_params=params))
        doc = json.loads(window.body)
        assert doc["window_id"] == w.id and doc["report"]["drift"]["drifted"] == w.drifted
        assert (await api.health(bare_request())).status_code == 200
        monitor.store.engine = create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
        down = await api.health(bare_request())
        assert down.status_code == 503
        assert json.loads(down.body) == {"status": "unavailable", "store": "OperationalError"}

    asyncio.run(scenario())
