"""The gateway's /docs is a working Swagger UI, and its /openapi.json is a valid OpenAPI 3.1 doc.

The browser tests drive Debian's headless chromium (`make browser`) through
Playwright against a real gateway in front of a real `mlflow models serve`
replica: expand the model's operation, "Try it out", "Execute", and read the
prediction in the response panel; with API keys on, through the Authorize
dialog. Playwright never downloads a browser here. Without chromium they skip,
except when CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation import OpenAPIV31SpecValidator
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from serving.gateway.openapi import build_openapi
from serving.model_metadata import deployment_from_model_dir
from tests.conftest import Service
from tests.helpers_serving import (
    FEW_COLUMNS,
    start_gateway,
)

CHROMIUM = "/usr/bin/chromium"
ADMIN = "admin-secret"
KEY = "swagger-key"
MODEL_PATH = "/models/bc/invocations"
TIMEOUT_MS = 30_000


# --- fixtures ----------------------------------------------------------------------------------


def _gateway(logs: Path, replica: Service, model_dir: Path, **env: str) -> Service:
    """A gateway with bc version 1 on `replica` (deployed through the admin API)."""
    server = start_gateway(logs, env={"FLOWLINE_ADMIN_TOKEN": ADMIN, **env})
    try:
        body = deployment_from_model_dir("bc", "1", [replica.url], model_dir).to_dict()
        answer = httpx.put(
            f"{server.url}/admin/deployments/bc",
            json=body,
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=30,
        )
        answer.raise_for_status()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def open_gateway(logs: Path, replica: Service, model_dir: Path) -> Iterator[Service]:
    """No API keys: /docs, /openapi.json and scoring are open."""
    server = _gateway(logs, replica, model_dir, FLOWLINE_DEFAULT_MODEL="bc")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keyed_gateway(logs: Path, replica: Service, model_dir: Path) -> Iterator[Service]:
    """API keys on: /docs, /openapi.json and scoring need `Authorization: Bearer KEY`."""
    server = _gateway(logs, replica, model_dir, FLOWLINE_API_KEYS=KEY)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Debian chromium under Playwright; skipped without it, except in CI."""
    missing = None
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        missing = f"no chromium at {CHROMIUM} (run `make browser`)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (the dev extra pins it)"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Swagger UI test needs a browser in CI: {missing}")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
            args=["--no-sandbox"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    try:
        tab = context.new_page()
        tab.set_default_timeout(TIMEOUT_MS)
        yield tab
    finally:
        context.close()


# --- helpers -----------------------------------------------------------------------------------


def expected_predictions(gateway: Service, headers: dict[str, str] | None = None) -> list[Any]:
    """What the gateway answers to the model's input example, sent without a browser."""
    spec = httpx.get(f"{gateway.url}/openapi.json", headers=headers, timeout=30).json()
    content = spec["paths"][MODEL_PATH]["post"]["requestBody"]["content"]["application/json"]
    answer = httpx.post(
        f"{gateway.url}{MODEL_PATH}", json=content["example"], headers=headers, timeout=30
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


def open_operation(page: Any, gateway: Service, load: bool = True) -> Any:
    """Load /docs (unless the page is already there), wait for Swagger to render, expand
    POST /models/bc/invocations."""
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    if load:
        answer = page.goto(f"{gateway.url}/docs")
        assert answer is not None and answer.status == 200
    operation = page.locator(f'.opblock-post:has(.opblock-summary-path[data-path="{MODEL_PATH}"])')
    operation.locator(".opblock-summary").first.click()
    operation.get_by_role("button", name="Try it out").click()
    # The page and everything it loaded came from the gateway itself: no CDN.
    outside = [url for url in requested if not url.startswith(gateway.url)]
    assert outside == [], outside
    if load:
        assert f"{gateway.url}/docs/assets/swagger-ui-bundle.js" in requested
        assert f"{gateway.url}/openapi.json" in requested
    return operation


def execute(operation: Any) -> tuple[str, str]:
    """Click Execute and return the response panel's status code and body text."""
    operation.get_by_role("button", name="Execute").click()
    row = operation.locator(".live-responses-table tbody .response").first
    status = row.locator(".response-col_status")
    status.wait_for()
    body = row.locator(".response-col_description pre").first
    body.wait_for()
    return status.inner_text().strip(), body.inner_text()


# --- browser tests -----------------------------------------------------------------------------


def test_try_it_out_scores_with_the_model(page: Any, open_gateway: Service) -> None:
    predictions = expected_predictions(open_gateway)
    operation = open_operation(page, open_gateway)
    # No keys configured: the spec declares no security, so Swagger offers no Authorize.
    assert page.locator(".auth-wrapper .authorize").count() == 0
    status, body = execute(operation)
    assert status == "200", body
    assert json.loads(body) == {"predictions": predictions}
    # The model summary under Swagger still lists every column.
    summary = page.locator("#models").inner_text()
    assert all(column in summary for column in FEW_COLUMNS)


def test_try_it_out_with_api_keys_after_authorize(page: Any, keyed_gateway: Service) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    # Without a key, /docs is only a key prompt: nothing about the models is in it.
    locked = httpx.get(f"{keyed_gateway.url}/docs", timeout=30)
    assert locked.status_code == 200 and 'id="key-form"' in locked.text
    assert not any(column in locked.text for column in FEW_COLUMNS)
    assert MODEL_PATH not in locked.text
    assert httpx.get(f"{keyed_gateway.url}/openapi.json", timeout=30).status_code == 401
    predictions = expected_predictions(keyed_gateway, auth)

    # A wrong key is refused on the page; the right one opens Swagger UI, authorized.
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{keyed_gateway.url}/docs")
    page.locator("#api-key").fill("not-the-key")
    page.locator("#key-form button").click()
    page.get_by_text("That key was refused.").wait_for()
    page.locator("#api-key").fill(KEY)
    page.locator("#key-form button").click()
    operation = open_operation(page, keyed_gateway, load=False)
    outside = [url for url in requested if not url.startswith(keyed_gateway.url)]
    assert outside == [] and f"{keyed_gateway.url}/openapi.json" in requested, requested
    status, body = execute(operation)
    assert status == "200", body
    assert json.loads(body) == {"predictions": predictions}
    curl = operation.locator(".curl-command").inner_text()
    assert f"Authorization: Bearer {KEY}" in curl

    # Logging out in the Authorize dialog: the gateway refuses scoring again.
    page.locator(".auth-wrapper .authorize").click()
    dialog = page.locator(".dialog-ux")
    dialog.locator("button:has-text('Logout')").first.click()
    dialog.locator("button.btn-done").click()
    operation.get_by_role("button", name="Clear").click()
    status, body = execute(operation)
    assert status == "401", body
    assert json.loads(body)["error_code"] == "UNAUTHENTICATED"


# --- OpenAPI validity --------------------------------------------------------------------------


@pytest.mark.parametrize("api_keys", [False, True])
def test_openapi_document_is_valid_3_1(model_dir: Path, api_keys: bool) -> None:
    d = deployment_from_model_dir("bc", "1", ["http://127.0.0.1:1"], model_dir)
    spec = build_openapi([d], d, api_keys=api_keys)
    validate(spec, cls=OpenAPIV31SpecValidator)
    assert spec["openapi"] == "3.1.0"
    if api_keys:
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["security"] == [{"bearer": []}]
        assert spec["paths"]["/ping"]["get"]["security"] == []  # the probes stay public
        assert "401" in spec["paths"][MODEL_PATH]["post"]["responses"]
    else:
        assert "securitySchemes" not in spec["components"] and "security" not in spec
        assert "401" not in spec["paths"][MODEL_PATH]["post"]["responses"]
    # The validator does catch a broken document (so this test can fail).
    broken = {key: value for key, value in spec.items() if key != "info"}  # info is required
    with pytest.raises(OpenAPIValidationError):
        validate(broken, cls=OpenAPIV31SpecValidator)


def test_served_openapi_documents_are_valid_3_1(
    open_gateway: Service, keyed_gateway: Service
) -> None:
    served = httpx.get(f"{open_gateway.url}/openapi.json", timeout=30).json()
    validate(served, cls=OpenAPIV31SpecValidator)
    assert "security" not in served
    keyed = httpx.get(
        f"{keyed_gateway.url}/openapi.json",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ).json()
    validate(keyed, cls=OpenAPIV31SpecValidator)
    assert keyed["security"] == [{"bearer": []}]
    # The assets are public (Swagger UI's own files, no model data); the page is not.
    asset = httpx.get(f"{keyed_gateway.url}/docs/assets/swagger-ui.css", timeout=30)
    assert asset.status_code == 200 and asset.headers["content-type"].startswith("text/css")
    assert httpx.get(f"{keyed_gateway.url}/docs/assets/nope.js", timeout=30).status_code == 404
