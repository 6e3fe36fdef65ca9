"""The API's documents: the OpenAPI document with this service's limits in it, and the interactive docs, /docs
(Swagger UI) and /redoc (ReDoc), served by the app itself.

FastAPI's defaults load Swagger UI and ReDoc from public CDNs: a blank page on a GPU host without internet. This is
FastAPI's documented self-hosting, with the files shipped in the fastapi-offline package (its version pins theirs).
ReDoc's bundle has one outside URL of its own, the sidebar's Redocly logo, which is pointed at a local image here,
so that opening either page sends no request off the host (tests/test_docs.py checks it in a real browser).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from .schemas import MAX_SEED
from .settings import Settings

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/static/docs"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def add_openapi_limits(app: FastAPI, settings: Settings, get_runtime: Callable) -> None:
    """/openapi.json as FastAPI makes it, with this service's limits (settings' max_n and max_steps, and once the
    runtime is up the model's size and name) in the request schemas, so clients and fuzzers see what it accepts."""

    def openapi() -> dict:
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
            rt = get_runtime()
            if rt is not None:  # what OpenAI's route accepts for size and model, for this model
                res = rt.weights.unet.config.image_size
                props = doc["components"]["schemas"]["ImageGenerationRequest"]["properties"]
                props["size"] = {**props["size"], "anyOf": [{"enum": [f"{res}x{res}", "auto"]}, {"type": "null"}]}
                props["model"] = {**props["model"], "anyOf": [{"enum": [rt.weights.name, "default"]},
                                                              {"type": "null"}]}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi


def add_docs(app: FastAPI) -> None:
    """Routes /docs, /redoc and their assets under ASSETS_URL (create the app with docs_url=redoc_url=None)."""
    redoc_js = (ASSETS_DIR / "redoc.standalone.js").read_text(encoding="utf-8")
    redoc_js = redoc_js.replace(REDOC_LOGO, f"{ASSETS_URL}/favicon.png")
    favicon = f"{ASSETS_URL}/favicon.png"

    @app.get(f"{ASSETS_URL}/redoc.standalone.js", include_in_schema=False)
    async def redoc_bundle() -> Response:  # matched before the mount below
        return Response(redoc_js, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})

    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS_URL}/swagger-ui.css", swagger_favicon_url=favicon)

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js", redoc_favicon_url=favicon,
                              with_google_fonts=False)
