"""Run the real app under uvicorn on a loopback port in a background thread, for tests and benchmarks."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc=None, timeout: float = 60) -> None:
    """Poll /readyz until it answers 200; fail if `proc` (a Popen) exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise RuntimeError(f"service at {url} did not become ready")
        time.sleep(0.05)


@contextmanager
def running(settings: Settings, weights=None, app_hook=None):
    """Yield (base_url, app) of a served app; stop it afterwards."""
    app = create_app(settings, weights)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    if app_hook:
        app_hook(app)
    try:
        yield url, app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def slow_steps(seconds: float):
    """An app_hook for running(): every engine step (one runner call, up to 10 chained steps) takes `seconds`
    longer, so that a test's timing holds against a step however fast the CPU (the tiny model's 1000-step chain
    takes 0.2-0.5 s on these VMs)."""

    def hook(app):
        engine = app.state.runtime.engine
        real = engine.step
        engine.step = lambda: (time.sleep(seconds), real())[1]

    return hook


def metric(url: str, name: str, labels: dict | None = None) -> float:
    """The value of one sample from /metrics (0 when absent), parsed with prometheus_client's parser."""
    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    return 0.0


def exported_series() -> set[str]:
    """Every series name the service's /metrics can show (a histogram's _bucket, _sum and _count; a counter's
    _total), read from a fresh registry: what dashboards and autoscalers may query."""
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""], "info": ["_info"]}
    families = text_string_to_metric_families(generate_latest(Metrics().registry).decode())
    return {f.name + s for f in families for s in suffixes[f.type]}


def decode_png(data: bytes | str) -> tuple[np.ndarray, dict]:
    if isinstance(data, str):
        data = base64.b64decode(data)
    img = Image.open(io.BytesIO(data))
    return np.asarray(img), dict(img.text)
