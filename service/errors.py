"""Errors as HTTP answers: each exception the routes raise becomes its status and a {"detail": ...} body (on
OpenAI's route also OpenAI's error object, which its clients read), and every refusal is counted in
celeba_ddpm_rejected_requests_total by reason."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .deps import Invalid, Unauthorized
from .jobs import NotFound
from .scheduler import JobError
from .schemas import REASON_STATUS


def _rejected(request: Request, reason: str) -> None:
    request.app.state.runtime.metrics.rejected.labels(reason).inc()


def error(request: Request, status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    """{"detail": ...}; on OpenAI's route also OpenAI's error object, which its clients read."""
    body: dict = {"detail": detail}
    if request.url.path.startswith("/v1/images/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body["error"] = {"message": detail, "type": kind, "param": None, "code": None}
    return JSONResponse(body, status_code=status, headers=headers)


async def job_error(request: Request, exc: JobError):
    if exc.reason in ("rate_limited", "queue_full", "store_full", "shutting_down", "worker_failed"):  # at the door
        _rejected(request, exc.reason)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
    return error(request, REASON_STATUS.get(exc.reason, 500), exc.message, headers)


async def unauthorized(request: Request, exc: Unauthorized):
    _rejected(request, "unauthorized")
    return error(request, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                 {"WWW-Authenticate": "Bearer"})


async def not_found(request: Request, exc: NotFound):
    return error(request, 404, str(exc))


async def invalid(request: Request, exc: Invalid):  # limits known only at run time; counted like schema errors
    _rejected(request, "invalid")
    return error(request, 422, str(exc))


async def http_error(request: Request, exc: StarletteHTTPException):
    if exc.status_code == 400:  # FastAPI's "error parsing the body" (e.g. invalid UTF-8): a 422 like any bad body
        _rejected(request, "invalid")
        return error(request, 422, "body: not valid JSON (it must be UTF-8, nested at most ~1000 deep)")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405:  # Allow: every method of the path (Starlette names only the first route's)
        methods = set()
        for route in request.app.router.routes:
            if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                methods |= route.methods
        headers = {"Allow": ", ".join(sorted(methods))}
    return error(request, exc.status_code, str(exc.detail), headers)


async def validation_error(request: Request, exc: RequestValidationError):
    _rejected(request, "invalid")
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ())[1:]) or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return error(request, 422, "; ".join(parts))


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(JobError, job_error)
    app.add_exception_handler(Unauthorized, unauthorized)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(Invalid, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
