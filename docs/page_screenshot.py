"""Make docs/page.png: the page at `/` with the shipped weights, mid-generation and finished, side by side.

    python docs/page_screenshot.py     # needs Debian's chromium and Playwright (pip install -e '.[dev]')

It starts `python -m service` on a loopback port, starts a 4-image 1000-step DDPM job from the page (previews every
100 steps), takes a screenshot half way and one when the job has finished, and joins them.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=ROOT)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        shots = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 760, "height": 1000})
            page.goto(url + "/")
            page.get_by_text("celeba32-cpu").first.wait_for()
            page.get_by_label("Seed").fill("7")
            page.get_by_role("button", name="Full 1000-step DDPM").click()
            page.wait_for_function("() => [...document.querySelectorAll('.job figure img')]"
                                   ".every(i => Number(i.dataset.step) >= 500)", timeout=120_000)
            shots.append(page.screenshot(full_page=False))
            page.locator(".job .state.succeeded").wait_for(timeout=180_000)
            shots.append(page.screenshot(full_page=False))
            browser.close()
        images = [Image.open(io.BytesIO(s)) for s in shots]
        out = Image.new("RGB", (sum(i.width for i in images) + 16, max(i.height for i in images)), "white")
        out.paste(images[0], (0, 0))
        out.paste(images[1], (images[0].width + 16, 0))
        out.save(ROOT / "docs" / "page.png", optimize=True)
        print(f"wrote {ROOT / 'docs' / 'page.png'} ({out.width}x{out.height})")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
