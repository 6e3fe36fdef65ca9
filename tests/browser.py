"""Debian's Chromium, headless, driven by Playwright, with every request that leaves 127.0.0.1 blocked and recorded.

Playwright's own browser download is unreachable here, so the tests use /usr/bin/chromium (installed by .ci/run).
Without it a test is skipped on a developer's machine and fails in CI (CI=true), where it must run.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlparse

from conftest import skip_or_fail

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def require_chromium() -> None:
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (pip install -e '.[dev]')")
    if missing:
        skip_or_fail("browser test needs " + " and ".join(missing))


@dataclass
class PageLog:
    blocked: list[str] = field(default_factory=list)  # requests to anywhere but loopback
    failed: list[str] = field(default_factory=list)  # requests that failed, or answered 4xx/5xx
    console_errors: list[str] = field(default_factory=list)


@contextmanager
def offline_page():
    """(page, log): a page in a fresh headless Chromium that can only reach 127.0.0.1."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    log = PageLog()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()

            def route(r):
                host = urlparse(r.request.url).hostname
                if r.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
                    r.continue_()
                else:
                    log.blocked.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.on("requestfailed", lambda req: log.failed.append(f"{req.url}: {req.failure}"))
            page.on("response", lambda resp: resp.status >= 400 and log.failed.append(f"{resp.url}: {resp.status}"))
            page.on("console", lambda msg: msg.type == "error" and log.console_errors.append(msg.text))
            yield page, log
        finally:
            browser.close()
