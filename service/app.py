"""The FastAPI app: POST /generate, GET /metrics, /healthz, /readyz, /v1/model."""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Callable

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model.device import DTYPE_NAMES
from model.diffusion import SAMPLERS
from model.images import grid, png_bytes, provenance
from model.unet import count_parameters
from model.weights import LoadedWeights

from .docs import ASSETS_URL as DOCS_ASSETS
from .docs import add_docs
from .runtime import Runtime, build_runtime
from .scheduler import GenerationError, Job
from .schemas import ERRORS, MAX_SEED, GenerateRequest, GenerateResponse, ModelInfo, Timings
from .schemas import Image as ImageOut
from .settings import Settings

log = logging.getLogger("celeba_ddpm.service")
ENDPOINTS = {"/generate", "/metrics", "/healthz", "/readyz", "/v1/model", "/openapi.json", "/docs", "/redoc",
             DOCS_ASSETS}


class MetricsAndLimits:
    """Pure ASGI middleware: counts every HTTP request by route and status, times it, and refuses
    bodies over the limit with 413 (by Content-Length, and while streaming when there is none)."""

    def __init__(self, app, get_runtime):
        self.app, self.get_runtime = app, get_runtime

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rt: Runtime = self.get_runtime()
        limit = rt.settings.max_body_bytes
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
    return path if "route" in scope else "unmatched"


def create_app(settings: Settings | None = None, weights: LoadedWeights | None = None,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """on_fatal: called if the denoising worker dies (python -m service exits non-zero so it is restarted)."""
    settings = settings or Settings()
    holder: dict[str, Runtime] = {}

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
                    "The same seed gives the same faces, whatever else shares the batch.",
        lifespan=lifespan,
    )
    app.add_middleware(MetricsAndLimits, get_runtime=lambda: holder["rt"])
    add_docs(app)

    def runtime(request: Request) -> Runtime:
        return request.app.state.runtime

    bearer = HTTPBearer(auto_error=False)

    def require_api_key(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        if key is None:
            return
        given = creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), key.encode()):
            runtime(request).metrics.rejected.labels("unauthorized").inc()
            raise GenerationError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, exc: GenerationError):
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        runtime(request).metrics.rejected.labels("invalid").inc()
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.post("/generate", response_model=GenerateResponse, responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or with `Accept: image/png` one PNG "
                                                           "(the image when n = 1, else a grid)"}, **ERRORS},
        dependencies=[Depends(require_api_key)], summary="Generate faces")
    async def generate(body: GenerateRequest, request: Request, rt: Runtime = Depends(runtime)):
        def invalid(detail: str) -> JSONResponse:  # limits known only at run time; counted like schema errors
            rt.metrics.rejected.labels("invalid").inc()
            return JSONResponse({"detail": detail}, status_code=422)

        if body.n > settings.max_n:
            return invalid(f"n: must be at most {settings.max_n}")
        if body.steps > rt.weights.diffusion.T:
            return invalid(f"steps: must be at most {rt.weights.diffusion.T}")
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - settings.max_n)
        if seed + body.n - 1 > MAX_SEED:
            return invalid(f"seed: seed + n - 1 must be at most {MAX_SEED}")
        timeout = body.deadline_s or settings.request_timeout_s
        job = Job(seed, body.n, body.sampler, body.steps,
                  deadline=time.monotonic() + timeout if timeout else None)
        try:
            future = asyncio.wrap_future(rt.scheduler.submit(job))
        except GenerationError as e:
            rt.metrics.rejected.labels(e.reason).inc()
            raise
        images = await _wait_or_disconnect(request, rt, job, future)
        png_accept = "image/png" in request.headers.get("accept", "")
        content = await run_in_threadpool(_encode, rt, job, images, png_accept)
        timings = Timings(queue_s=round(job.started_at - job.enqueued_at, 6),
                          generate_s=round(job.finished_at - job.started_at, 6))
        if png_accept:
            return Response(content, media_type="image/png", headers={
                "X-Seed": str(seed), "X-Model": rt.weights.name, "X-Queue-Seconds": f"{timings.queue_s:.6f}",
                "X-Generate-Seconds": f"{timings.generate_s:.6f}"})
        return GenerateResponse(seed=seed, model=rt.weights.name, sampler=body.sampler, steps=body.steps,
                                images=[ImageOut(seed=seed + i, png=b) for i, b in enumerate(content)],
                                timings=timings)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics(rt: Runtime = Depends(runtime)):
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", summary="The process and its denoising worker are alive",
             responses={503: {"description": "the denoising worker died: restart the process"}})
    async def healthz(rt: Runtime = Depends(runtime)):
        if not rt.healthy():
            return JSONResponse({"status": "denoising worker failed"}, status_code=503)
        return {"status": "ok"}

    @app.get("/readyz", summary="Weights loaded, warmed up and admitting requests",
             responses={503: {"description": "not ready (starting, shutting down, or the worker failed)"}})
    async def readyz(rt: Runtime = Depends(runtime)):
        if not rt.ready or not rt.scheduler.alive():
            return JSONResponse({"status": "not ready"}, status_code=503)
        queued, active = rt.scheduler.depth()
        return {"status": "ready", "queued_requests": queued, "active_samples": active}

    @app.get("/v1/model", response_model=ModelInfo, summary="The served model")
    async def model_info(rt: Runtime = Depends(runtime)):
        w, cfg = rt.weights, rt.weights.unet.config
        return ModelInfo(name=w.name, sha256=w.sha256, resolution=cfg.image_size, architecture=cfg.to_dict(),
                         parameters=count_parameters(rt.engine.unet), schedule=w.diffusion.config.to_dict(),
                         dataset=w.metadata.get("dataset", ""), training_steps=int(w.metadata["training_steps"]),
                         device=str(rt.engine.device), dtype=DTYPE_NAMES[rt.engine.dtype], runner=rt.engine.runner.mode,
                         samplers=list(SAMPLERS),
                         max_n=settings.max_n, max_batch=rt.scheduler.max_batch)

    return app


async def _wait_or_disconnect(request: Request, rt: Runtime, job: Job, future: asyncio.Future) -> np.ndarray:
    """Await the job; if the client goes away (or this task is cancelled), take its samples out of the batch."""
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if not rt.scheduler.healthy():  # never wait on a dead worker (it fails its futures; belt and braces)
                raise GenerationError(503, "the denoising worker failed; retry", retry_after=10)
            if await request.is_disconnected():
                rt.scheduler.cancel(job, GenerationError(499, "client disconnected"), "disconnect")
                return await future  # raises the cancellation (the response goes nowhere)
    except asyncio.CancelledError:
        rt.scheduler.cancel(job, GenerationError(503, "request cancelled"), "server_cancelled")
        raise


def _encode(rt: Runtime, job: Job, images: np.ndarray, as_one_png: bool):
    """PNG-encode off the event loop and off the denoising thread."""
    w = rt.weights
    if as_one_png:
        if job.n == 1:
            return png_bytes(images[0], provenance(job.seed, job.sampler, job.steps, w.sha256, w.name))
        text = provenance(job.seed, job.sampler, job.steps, w.sha256, w.name)
        text["seeds"] = f"{job.seed}-{job.seed + job.n - 1}"
        return png_bytes(grid(images), text)
    return [base64.b64encode(png_bytes(img, provenance(job.seed + i, job.sampler, job.steps, w.sha256, w.name)))
            .decode() for i, img in enumerate(images)]
