"""The page at `/`, used as a person would in headless Chromium: make faces, watch previews, cancel, errors, keys."""

import base64
import io

import httpx
import pytest
from PIL import Image

from service.settings import Settings

from browser import offline_page
from service_helpers import running, slow_steps


@pytest.fixture(scope="module")
def served(tiny_weights):
    # 50 ms per step, so that a 20-step job lasts long enough (1 s) to show previews on the way
    with running(Settings(weights=tiny_weights, max_batch=8, max_n=8, warmup=False), app_hook=slow_steps(0.05)) as s:
        yield s


def test_the_page_is_served_with_a_strict_policy(served):
    url, _ = served
    r = httpx.get(url + "/")
    csp = r.headers["content-security-policy"]
    assert r.status_code == 200 and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "<script" in r.text and "<script>" not in r.text  # no inline script
    js = httpx.get(url + "/static/app.js")
    assert js.status_code == 200 and "max-age" in js.headers["cache-control"] and js.headers.get("etag")


def test_make_four_faces_and_watch_them_form(served):
    url, _ = served
    with offline_page() as (page, log):
        page.goto(url + "/")
        page.get_by_text("tiny-test").wait_for()
        assert not page.get_by_label("API key").is_visible()  # no keys configured: no key field
        page.get_by_label("Images").fill("4")
        page.get_by_label("Seed").fill("100")
        page.get_by_label("Sampler").select_option("ddim")
        page.get_by_label("Steps", exact=True).fill("20")
        page.get_by_label("Preview every").fill("5")
        page.get_by_role("button", name="Make faces").click()
        # a preview (an image that is not yet final, at a step before the last) appears before the job ends
        page.wait_for_function("""() => [...document.querySelectorAll('.job figure img')]
            .some(i => i.dataset.step && Number(i.dataset.step) < 20 && !i.dataset.final)""", timeout=20_000)
        assert page.locator(".job .state").first.inner_text() in ("running", "queued")
        page.locator(".job .state.succeeded").wait_for(timeout=30_000)
        images = page.locator(".job figure img[data-final]")
        assert images.count() == 4
        for i in range(4):
            src = images.nth(i).get_attribute("src")
            png = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
            assert png.size == (8, 8) and png.text["seed"] == str(100 + i)  # decodable, its own seed
            assert f"seed {100 + i}" in page.locator(".job figcaption").nth(i).inner_text()
        assert page.get_by_role("link", name="Download PNG").count() == 4
        assert "v1/jobs" in page.locator(".job .curl pre").text_content()  # inside a closed <details>
        assert page.locator("#history li").count() == 1
        assert log.blocked == [] and log.failed == [] and log.console_errors == [], log


def test_cancel_a_long_job_from_the_page(served):
    url, _ = served
    with offline_page() as (page, log):
        page.goto(url + "/")
        page.get_by_role("button", name="Full 1000-step DDPM").click()
        page.locator(".job .state.running").wait_for(timeout=20_000)
        page.get_by_role("button", name="Cancel").click()
        page.locator(".job .state.cancelled").wait_for(timeout=20_000)
        assert "Cancelled" in page.locator(".job .status").inner_text()
        assert log.console_errors == [], log


def test_bad_input_shows_the_servers_message(served):
    url, _ = served
    with offline_page() as (page, log):
        page.goto(url + "/")
        page.get_by_label("Steps", exact=True).fill("2000")
        page.get_by_role("button", name="Make faces").click()
        error = page.locator("#form-error")
        error.wait_for()
        assert "422" in error.inner_text() and "steps" in error.inner_text() and "1000" in error.inner_text()
        assert page.locator(".job").count() == 0


def test_with_an_api_key_the_page_asks_for_it(tiny_weights):
    with running(Settings(weights=tiny_weights, warmup=False, api_key="page-key")) as (url, _):
        with offline_page() as (page, log):
            page.goto(url + "/")
            page.get_by_label("API key").wait_for()  # /v1/model says a key is needed
            page.get_by_label("Steps", exact=True).fill("3")
            page.get_by_role("button", name="Make faces").click()
            page.locator("#form-error").wait_for()
            assert "API key" in page.locator("#form-error").inner_text()  # the 401, in words
            page.get_by_label("API key").fill("page-key")
            page.get_by_role("button", name="Make faces").click()
            page.locator(".job .state.succeeded").wait_for(timeout=30_000)
