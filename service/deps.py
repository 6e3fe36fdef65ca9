"""What the routes share: the runtime, authentication, job submission, and PNG encoding off the event loop."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time

import numpy as np
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from model.images import grid, png_bytes, provenance

from .jobs import JobRecord
from .runtime import Runtime
from .scheduler import Job, JobError
from .schemas import MAX_SEED, GenerateRequest, Timings


class Unauthorized(Exception):
    """No key, or a wrong one (401)."""


class Invalid(Exception):
    """A request that breaks a limit known only at run time (422), counted like schema errors."""


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def make_auth(keys: list[str]):
    """A dependency giving the caller's identity: None without keys, else a digest of the key they sent (the job
    store scopes jobs by it). With keys, it declares bearer auth in the OpenAPI document; without, it declares
    nothing (an unauthenticated 200 is then correct)."""
    if not keys:
        def no_auth() -> None:
            return None
        return no_auth
    encoded = [k.encode() for k in keys]
    bearer = HTTPBearer(auto_error=False)

    def owner(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        given = (creds.credentials if creds is not None and creds.scheme.lower() == "bearer" else "").encode()
        matches = [hmac.compare_digest(given, k) for k in encoded]  # every key compared: constant time in which
        if not any(matches):
            raise Unauthorized()
        return hashlib.sha256(given).hexdigest()[:16]
    return owner


def max_seed(rt: Runtime) -> int:
    """The largest seed a request may give: seed + n - 1 stays within MAX_SEED for every n up to MAX_N."""
    return MAX_SEED - rt.settings.max_n + 1


def max_steps(rt: Runtime) -> int:
    return min(rt.weights.diffusion.T, rt.settings.max_steps or rt.weights.diffusion.T)


def check_limits(rt: Runtime, body: GenerateRequest) -> tuple[int, int]:
    """The run-time limits of a request; returns its seed (random when absent) and steps (the default: the most
    this service allows, normally the full chain)."""
    if body.n > rt.settings.max_n:
        raise Invalid(f"n: must be at most {rt.settings.max_n}")
    limit = max_steps(rt)
    steps = body.steps if "steps" in body.model_fields_set else limit
    if steps > limit:
        raise Invalid(f"steps: must be at most {limit}")
    top = max_seed(rt)
    seed = body.seed if body.seed is not None else secrets.randbelow(top + 1)
    if seed > top:
        raise Invalid(f"seed: must be at most {top} (2^53 - MAX_N: seeds seed..seed+n-1 stay below 2^53)")
    return seed, steps


def submit(rt: Runtime, job: Job, owner: str | None, kind: str, idempotency_key: str | None = None,
           client: str | None = None) -> JobRecord:
    """Put a job in the store and the queue (both bounded: JobError store_full / queue_full when full), within the
    caller's rate limits (JobError rate_limited)."""
    caller = owner or client or "anonymous"
    rt.rate_limits.check(caller, job.n)
    store = rt.store

    def ended(record: JobRecord) -> None:
        store.finished(record, keep=record.kind == "job")

    record = JobRecord(job, owner, kind, idempotency_key, on_end=ended, replica=rt.settings.replica)
    store.add(record)
    try:
        rt.scheduler.submit(job)
    except JobError:
        store.finished(record, keep=False)
        raise
    rt.rate_limits.hit(caller, job.n)  # only accepted work counts (no await since check(): nothing slips between)
    return record


def new_job(rt: Runtime, body: GenerateRequest, seed: int, steps: int, preview_every: int = 0) -> Job:
    timeout = body.deadline_s or rt.settings.request_timeout_s
    return Job(seed, body.n, body.sampler, steps, deadline=time.monotonic() + timeout if timeout else None,
               preview_every=preview_every)


async def wait_or_disconnect(request: Request, rt: Runtime, job: Job) -> np.ndarray:
    """Await the job; if the client goes away (or this task is cancelled), take its samples out of the batch."""
    future = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({future}, timeout=0.25)
            if done:
                return future.result()
            if not rt.scheduler.healthy():  # never wait on a dead worker (it fails its futures; belt and braces)
                raise JobError("worker_failed", "the denoising worker failed; retry", retry_after=10)
            if await request.is_disconnected():
                rt.scheduler.cancel(job, JobError("disconnect", "client disconnected"))
                return await future  # raises the cancellation (the response goes nowhere)
    except asyncio.CancelledError:
        rt.scheduler.cancel(job, JobError("server_cancelled", "request cancelled"))
        raise


def _provenance(rt: Runtime, job: Job, seed: int) -> dict:
    return provenance(seed, job.sampler, job.chain_steps or job.steps, rt.weights.sha256, rt.weights.name)


def encode_pngs(rt: Runtime, job: Job, images: np.ndarray) -> list[bytes]:
    """One PNG per image, with its provenance chunks (run off the event loop and off the denoising thread)."""
    return [png_bytes(img, _provenance(rt, job, job.seed + i)) for i, img in enumerate(images)]


def encode_grid(rt: Runtime, job: Job, images: np.ndarray) -> bytes:
    if job.n == 1:
        return png_bytes(images[0], _provenance(rt, job, job.seed))
    text = _provenance(rt, job, job.seed)
    text["seeds"] = f"{job.seed}-{job.seed + job.n - 1}"
    return png_bytes(grid(images), text)


async def record_pngs(rt: Runtime, record: JobRecord) -> list[bytes]:
    """A finished job's PNGs, encoded once."""
    if record.pngs is None:
        images = record.job.future.result()
        record.pngs = await run_in_threadpool(encode_pngs, rt, record.job, images)
    return record.pngs


def job_timings(job: Job) -> Timings | None:
    """Seconds a finished job waited and ran (None until it has finished)."""
    if job.started_at is None or job.finished_at is None:
        return None
    return Timings(queue_s=round(job.started_at - job.enqueued_at, 6),
                   generate_s=round(job.finished_at - job.started_at, 6))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
