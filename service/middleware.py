"""The HTTP middleware: every request counted by route and status and timed (service/metrics.py), and bodies
over the size limits refused with 413 before the app reads them."""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse

from .docs import ASSETS_URL as DOCS_ASSETS
from .runtime import Runtime

# Labels for requests answered before routing (a 413 by Content-Length) or by a mount; the rest use their route.
ENDPOINTS = {"/", "/generate", "/v1/images/generations", "/v1/jobs", "/v1/edits", "/v1/interpolations", "/metrics",
             "/healthz", "/readyz", "/v1/model",
             "/openapi.json", "/docs", "/redoc", DOCS_ASSETS, "/static"}


class MetricsAndLimits:
    """Pure ASGI middleware: counts every HTTP request by route and status, times it, and refuses
    bodies over the limit with 413 (by Content-Length, and while streaming when there is none)."""

    def __init__(self, app, get_runtime):
        self.app, self.get_runtime = app, get_runtime

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rt: Runtime = self.get_runtime()
        # photos come to /v1/edits; everything else is a small JSON body
        limit = rt.settings.max_upload_bytes if scope.get("path") == "/v1/edits" else rt.settings.max_body_bytes
        state = {"status": 500, "refused": False, "received": 0}
        t0 = time.perf_counter()

        async def send_wrapper(message):
            if state["refused"]:
                return  # the 413 has gone out: whatever the app answers to the cut-off body goes nowhere
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            await send(message)

        async def refuse():
            rt.metrics.rejected.labels("body_too_large").inc()
            resp = JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
            await resp(scope, receive, send_wrapper)
            state["refused"] = True

        async def receive_limited():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit and not state["refused"]:
                    # A body without Content-Length (chunked) that grows past the limit: answer 413 now and tell
                    # the app the client left (raising here would reach FastAPI's body parser, which makes a 400).
                    await refuse()
                    return {"type": "http.disconnect"}
            return message

        length = dict(scope.get("headers") or []).get(b"content-length")
        try:
            if length is not None and length.isdigit() and int(length) > limit:
                await refuse()
            else:
                await self.app(scope, receive_limited, send_wrapper)
        finally:
            endpoint = _endpoint_label(scope)
            rt.metrics.requests.labels(endpoint, scope["method"], str(state["status"])).inc()
            rt.metrics.request_duration.labels(endpoint).observe(time.perf_counter() - t0)


def _endpoint_label(scope) -> str:
    """The route template; the docs' asset files share one label, and unknown paths another, so that scanners
    cannot blow up the metrics' cardinality."""
    path = getattr(scope.get("route"), "path", None) or scope["path"]
    if path in ENDPOINTS:
        return path
    if path.startswith(DOCS_ASSETS + "/"):
        return DOCS_ASSETS
    if path.startswith("/static/"):
        return "/static"
    return path if "route" in scope else "unmatched"
