"""The page at `/`: service/static/ (plain HTML, CSS and JavaScript, no build step, nothing from outside), with
cache headers on its files and a strict Content-Security-Policy (no inline script, no outside origin)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer"}


class CachedStatic(StaticFiles):
    """StaticFiles (ETag, Last-Modified, 304s) plus Cache-Control: browsers revalidate after an hour."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update({"Cache-Control": "public, max-age=3600", **SECURITY_HEADERS})
        return response


def add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache", **SECURITY_HEADERS})

    app.mount("/static", CachedStatic(directory=STATIC_DIR), name="page")
