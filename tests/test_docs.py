"""/docs and /redoc render offline: their JavaScript and CSS come from the service itself, never a CDN."""

import httpx
import pytest

from service.settings import Settings

from browser import offline_page
from service_helpers import metric, running


@pytest.fixture(scope="module")
def served(tiny_weights):
    with running(Settings(weights=tiny_weights, warmup=False)) as (url, app):
        yield url, app


def test_docs_html_points_only_at_the_service_itself(served):
    url, _ = served
    for path in ("/docs", "/redoc"):
        html = httpx.get(url + path).text
        assert "cdn.jsdelivr.net" not in html and "fonts.googleapis.com" not in html and "https://" not in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = httpx.get(f"{url}/static/docs/{asset}")
        assert r.status_code == 200 and len(r.content) > 100_000, asset
    assert metric(url, "celeba_ddpm_http_requests_total", {"endpoint": "/static/docs", "status": "200"}) >= 3


def test_swagger_ui_renders_the_generate_operation_with_the_network_cut_off(served):
    url, _ = served
    with offline_page() as (page, log):
        page.goto(url + "/docs")
        op = page.locator(".opblock-summary-path", has_text="/generate")
        op.first.wait_for(timeout=20_000)
        summaries = page.locator(".opblock-summary-description").all_inner_texts()
        assert "Generate faces" in summaries and "Start a job" in summaries
        assert log.blocked == [] and log.failed == [] and log.console_errors == [], log


def test_redoc_renders_the_generate_operation_with_the_network_cut_off(served):
    url, _ = served
    with offline_page() as (page, log):
        page.goto(url + "/redoc")
        page.get_by_text("Generate faces").first.wait_for(timeout=30_000)
        assert log.blocked == [] and log.failed == [] and log.console_errors == [], log
