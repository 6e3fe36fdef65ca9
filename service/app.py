"""The FastAPI app, assembled: the runtime's lifespan, the middleware, error mapping, and the routers
(service/api_images.py, api_jobs.py, api_ops.py, docs.py)."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from model.device import DTYPE_NAMES
from model.weights import LoadedWeights

from .api_edits import edits_router
from .api_images import images_router
from .api_jobs import jobs_router
from .api_ops import ops_router
from .deps import Invalid, Unauthorized, make_auth
from .docs import ASSETS_URL as DOCS_ASSETS
from .docs import add_docs
from .jobs import NotFound
from .page import add_page
from .runtime import Runtime, build_runtime
from .scheduler import JobError
from .schemas import MAX_SEED, REASON_STATUS
from .settings import Settings

log = logging.getLogger("celeba_ddpm.service")
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


def create_app(settings: Settings | None = None, weights: LoadedWeights | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """on_fatal: called if the denoising worker dies (python -m service exits non-zero so it is restarted)."""
    settings = settings or Settings()
    holder: dict[str, Runtime] = {}
    keys = settings.keys()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = build_runtime(settings, weights, on_fatal)  # a bad weights file raises here and stops start-up
        holder["rt"] = app.state.runtime = rt
        rt.scheduler.start()  # the worker warms up on its own thread first
        await run_in_threadpool(rt.scheduler.started.wait)
        if rt.scheduler.fatal is not None:
            raise RuntimeError(f"warm-up failed: {rt.scheduler.fatal!r}")
        rt.ready = True
        log.info("ready: %s (%s) on %s/%s", rt.weights.name, rt.weights.sha256[:12], rt.engine.device,
                 DTYPE_NAMES[rt.engine.dtype])
        yield
        await run_in_threadpool(lambda: rt.drain().join())

    app = FastAPI(
        docs_url=None, redoc_url=None,  # served offline by service/docs.py
        title="celeba-ddpm",
        version="0.1.0",
        summary="Photographs of faces from a DDPM trained on CelebA, with step-level continuous batching.",
        description="POST /generate returns PNG faces (JSON with base64 PNGs, or one PNG with `Accept: image/png`). "
                    "POST /v1/jobs returns a handle at once, with progress, previews of each image forming and "
                    "cancel; POST /v1/images/generations speaks OpenAI's Images API. The same seed gives the same "
                    "faces, whatever else shares the batch."
                    + ("" if keys else " No API keys are configured: every route is open."),
        lifespan=lifespan,
    )
    app.add_middleware(MetricsAndLimits, get_runtime=lambda: holder["rt"])
    auth = make_auth(keys)
    app.include_router(images_router(auth))
    app.include_router(jobs_router(auth))
    app.include_router(edits_router(auth))
    app.include_router(ops_router(settings))
    add_docs(app)  # its /static/docs mount goes before the page's /static
    add_page(app)

    def rejected(request: Request, reason: str) -> None:
        request.app.state.runtime.metrics.rejected.labels(reason).inc()

    def error(request: Request, status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        """{"detail": ...}; on OpenAI's route also OpenAI's error object, which its clients read."""
        body: dict = {"detail": detail}
        if request.url.path.startswith("/v1/images/"):
            kind = "invalid_request_error" if status < 500 else "server_error"
            body["error"] = {"message": detail, "type": kind, "param": None, "code": None}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError):
        if exc.reason in ("rate_limited", "queue_full", "store_full", "shutting_down", "worker_failed"):  # at the door
            rejected(request, exc.reason)
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        return error(request, REASON_STATUS.get(exc.reason, 500), exc.message, headers)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized):
        rejected(request, "unauthorized")
        return error(request, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                     {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return error(request, 404, str(exc))

    @app.exception_handler(Invalid)
    async def invalid(request: Request, exc: Invalid):  # limits known only at run time; counted like schema errors
        rejected(request, "invalid")
        return error(request, 422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. invalid UTF-8): a 422 like any bad body
            rejected(request, "invalid")
            return error(request, 422, "body: not valid JSON (it must be UTF-8, nested at most ~1000 deep)")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Allow: every method of the path (Starlette names only the first route's)
            methods = set()
            for route in request.app.router.routes:
                if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                    methods |= route.methods
            headers = {"Allow": ", ".join(sorted(methods))}
        return error(request, exc.status_code, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        rejected(request, "invalid")
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        return error(request, 422, "; ".join(parts))

    def openapi() -> dict:
        """FastAPI's document, with the limits this service sets (MAX_N, MAX_STEPS) in the request schemas."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                              description=app.description, routes=app.routes)
            limit = min(1000, settings.max_steps or 1000)
            for name in ("GenerateRequest", "JobRequest", "ImageGenerationRequest"):
                props = doc["components"]["schemas"][name]["properties"]
                props["n"]["maximum"] = settings.max_n
                props["seed"]["anyOf"][0]["maximum"] = MAX_SEED - settings.max_n + 1  # deps.max_seed
                props["steps"].update(maximum=limit, default=limit)
            props = doc["components"]["schemas"]["InterpolationRequest"]["properties"]
            props["steps"].update(maximum=limit, default=min(50, limit))
            rt = holder.get("rt")
            if rt is not None:  # what OpenAI's route accepts for size and model, for this model
                res = rt.weights.unet.config.image_size
                props = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
                props["size"] = {**props["size"], "anyOf": [{"enum": [f"{res}x{res}", "auto"]}, {"type": "null"}]}
                props["model"] = {**props["model"], "anyOf": [{"enum": [rt.weights.name, "default"]},
                                                              {"type": "null"}]}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    return app
