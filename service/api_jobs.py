"""Job handles: POST /v1/jobs, GET /v1/jobs/{id}, its images, its Server-Sent Event stream, and DELETE to cancel."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse

from model.images import png_bytes

from .deps import Invalid, b64, check_limits, job_timings, new_job, record_pngs, runtime, submit
from .jobs import Event, JobRecord, NotFound
from .runtime import Runtime
from .scheduler import TERMINAL, JobError
from .schemas import ERRORS, JOB_ERRORS, MAX_PREVIEWS, Image, ImageProgress, JobErrorInfo, JobInfo, JobRequest

KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
EVENTS_EXAMPLE = ('event: running\ndata: {"step": 0, "steps": 2000, "eta_s": null}\n\n'
                  'event: progress\ndata: {"step": 400, "steps": 2000, "eta_s": 9.7}\n\n'
                  'event: preview\ndata: {"index": 0, "step": 200, "png": "iVBORw0KGgo..."}\n\n'
                  'event: completed\ndata: {"images": [{"seed": 7, "png": "iVBORw0KGgo..."}, '
                  '{"seed": 8, "png": "iVBORw0KGgo..."}]}\n\n')


def jobs_router(auth) -> APIRouter:
    router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

    def find(job_id: str, rt: Runtime = Depends(runtime), owner: str | None = Depends(auth)) -> JobRecord:
        return rt.store.get(job_id, owner)

    @router.post("", status_code=202, response_model=JobInfo, summary="Start a job",
                 responses={202: {"description": "accepted; `Location` names the job",
                                  "headers": {"Location": {"schema": {"type": "string"}}}}, **ERRORS},
                 description="The body of /generate plus `preview_every`. Returns at once with the job's handle. "
                             "An `Idempotency-Key` header returns the same job for a repeat while it is kept.")
    async def create(body: JobRequest, request: Request, rt: Runtime = Depends(runtime),
                     owner: str | None = Depends(auth),
                     idempotency_key: str | None = Header(None, max_length=255)):
        if idempotency_key is not None:
            existing = rt.store.by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                return await _accepted(rt, existing)
        seed, steps = check_limits(rt, body)
        if body.preview_every and steps // body.preview_every > MAX_PREVIEWS:
            raise Invalid(f"preview_every: at most {MAX_PREVIEWS} previews per image: with {steps} steps, "
                          f"at least {-(-steps // MAX_PREVIEWS)}")
        record = submit(rt, new_job(rt, body, seed, steps, body.preview_every), owner, kind="job",
                        idempotency_key=idempotency_key, client=request.client.host if request.client else None)
        return await _accepted(rt, record)

    async def _accepted(rt: Runtime, record: JobRecord) -> JSONResponse:
        info = await job_info(rt, record)
        return JSONResponse(info.model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/v1/jobs/{record.id}"})

    @router.get("/{job_id}", response_model=JobInfo, responses=JOB_ERRORS, summary="A job's state")
    async def get(record: JobRecord = Depends(find), rt: Runtime = Depends(runtime)):
        return await job_info(rt, record)

    @router.get("/{job_id}/images/{index}", response_class=Response, summary="One finished image as PNG",
                responses={200: {"content": {"image/png": {}}}, 409: {"description": "the job has not succeeded"},
                           **JOB_ERRORS})
    async def image(index: int, record: JobRecord = Depends(find), rt: Runtime = Depends(runtime)):
        if record.state != "succeeded":
            return JSONResponse({"detail": f"job is {record.state}: images exist once it has succeeded"},
                                status_code=409)
        if not 0 <= index < record.job.n:
            raise NotFound(f"no image {index}: the job has {record.job.n} (0 to {record.job.n - 1})")
        return Response((await record_pngs(rt, record))[index], media_type="image/png",
                        headers={"X-Seed": str(record.job.seed + index)})

    @router.delete("/{job_id}", response_model=JobInfo, responses=JOB_ERRORS, summary="Cancel a job",
                   description="Its samples leave the batch before the next step. Cancelling a finished job "
                               "changes nothing and answers its state.")
    async def cancel(record: JobRecord = Depends(find), rt: Runtime = Depends(runtime)):
        if record.state not in TERMINAL:
            rt.scheduler.cancel(record.job, JobError("cancelled", "cancelled by the client"))
            try:
                await asyncio.wait_for(record.done.wait(), timeout=30)
            except asyncio.TimeoutError:
                pass  # a step longer than 30 s: the job still leaves before the next one
        return await job_info(rt, record)

    @router.get("/{job_id}/events", response_class=StreamingResponse, responses={
        200: {"content": {"text/event-stream": {"example": EVENTS_EXAMPLE}}, "description":
              "`queued` (queue_position), `running`, `progress` (step, steps, eta_s), `preview` (index, step, png: "
              "the image's x0 estimate, clipped to [-1, 1]), then exactly one of `completed` (images), `failed`, "
              "`cancelled` (reason, detail). A late subscriber gets the current state first. Disconnecting does "
              "not cancel the job (DELETE does)."}, **JOB_ERRORS}, summary="A job's events (Server-Sent Events)")
    async def events(record: JobRecord = Depends(find), rt: Runtime = Depends(runtime)):
        return StreamingResponse(_stream(rt, record), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router


async def _stream(rt: Runtime, record: JobRecord):
    q = record.subscribe()
    rt.metrics.event_streams.inc()
    try:
        while True:
            try:
                event: Event = await asyncio.wait_for(q.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event.text is None:  # every subscriber gets the same Event: encode it once
                data = dict(event.data)
                if event.kind == "preview":
                    data["png"] = b64(await run_in_threadpool(png_bytes, event.image))
                elif event.kind == "completed":
                    pngs = await record_pngs(rt, record)
                    data["images"] = [{"seed": record.job.seed + i, "png": b64(p)} for i, p in enumerate(pngs)]
                event.text = f"event: {event.kind}\ndata: {json.dumps(data)}\n\n"
            if event.kind == "preview":
                rt.metrics.previews.inc()
            yield event.text
            if event.kind in ("completed", "failed", "cancelled"):
                return
    finally:
        record.unsubscribe(q)
        rt.metrics.event_streams.dec()


async def job_info(rt: Runtime, record: JobRecord) -> JobInfo:
    job, state = record.job, record.state
    timings = job_timings(job)
    images = None
    if state == "succeeded":
        images = [Image(seed=job.seed + i, png=b64(p)) for i, p in enumerate(await record_pngs(rt, record))]
    error = JobErrorInfo(reason=job.error.reason, detail=job.error.message) if job.error is not None else None
    return JobInfo(id=record.id, state=state, queue_position=job.position if state == "queued" else None,
                   created=int(record.created), n=job.n, seed=job.seed, sampler=job.sampler, steps=job.steps,
                   preview_every=job.preview_every, step=job.steps_done_total(), total_steps=job.n * job.steps,
                   images_progress=[ImageProgress(index=i, seed=job.seed + i, step=s, steps=job.steps)
                                    for i, s in enumerate(job.steps_done)],
                   eta_s=record.eta_s() if state in ("queued", "running") else None, timings=timings,
                   error=error, images=images)
