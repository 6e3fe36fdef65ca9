"""The FastAPI app, assembled: the runtime's lifespan, the middleware (service/middleware.py), the routers
(api_images.py, api_jobs.py, api_edits.py, api_ops.py), the error mapping (errors.py), the API documents
(docs.py) and the page (page.py)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from model.device import DTYPE_NAMES
from model.weights import LoadedWeights

from .api_edits import edits_router
from .api_images import images_router
from .api_jobs import jobs_router
from .api_ops import ops_router
from .deps import make_auth
from .docs import add_docs, add_openapi_limits
from .errors import add_error_handlers
from .middleware import MetricsAndLimits
from .page import add_page
from .runtime import Runtime, build_runtime
from .settings import Settings

log = logging.getLogger("celeba_ddpm.service")


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
    add_error_handlers(app)
    add_openapi_limits(app, settings, lambda: holder.get("rt"))
    return app
