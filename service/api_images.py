"""Routes that answer with images when they are done: POST /generate, and OpenAI's POST /v1/images/generations."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from model.images import png_bytes

from .deps import (Invalid, b64, check_limits, encode_grid, encode_pngs, job_timings, new_job, runtime,
                   submit, wait_or_disconnect)
from .runtime import Runtime
from .scheduler import JobError
from .schemas import (ERRORS, GenerateRequest, GenerateResponse, Image, ImageData, ImageGenerationRequest,
                      ImagesResponse)


def images_router(auth) -> APIRouter:
    router = APIRouter()

    @router.post("/generate", response_model=GenerateResponse, responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or with `Accept: image/png` one PNG "
                                                           "(the image when n = 1, else a grid)"}, **ERRORS},
        summary="Generate faces")
    async def generate(body: GenerateRequest, request: Request, rt: Runtime = Depends(runtime),
                       owner: str | None = Depends(auth)):
        seed, steps = check_limits(rt, body)
        job = new_job(rt, body, seed, steps)
        submit(rt, job, owner, kind="request", client=request.client.host if request.client else None)
        images = await wait_or_disconnect(request, rt, job)
        timings = job_timings(job)
        if "image/png" in request.headers.get("accept", ""):
            content = await run_in_threadpool(encode_grid, rt, job, images)
            return Response(content, media_type="image/png", headers={
                "X-Seed": str(seed), "X-Model": rt.weights.name, "X-Queue-Seconds": f"{timings.queue_s:.6f}",
                "X-Generate-Seconds": f"{timings.generate_s:.6f}"})
        pngs = await run_in_threadpool(encode_pngs, rt, job, images)
        return GenerateResponse(seed=seed, model=rt.weights.name, sampler=body.sampler, steps=steps,
                                images=[Image(seed=seed + i, png=b64(p)) for i, p in enumerate(pngs)],
                                timings=timings)

    @router.post("/v1/images/generations", response_model=ImagesResponse, responses={
        200: {"content": {"text/event-stream": {}},
              "description": "JSON, or with `stream`: Server-Sent Events `image_generation.partial_image` "
                             "(x0 estimates) then `image_generation.completed`"}, **ERRORS},
        summary="Generate faces (OpenAI Images API)",
        description="OpenAI's image generation request and response, so its clients work (`base_url` pointed "
                    "here). The model is unconditional: `prompt` is accepted and ignored. `size` must be the "
                    "model's resolution; only `b64_json` PNGs are returned. Extensions: `seed`, `steps`, "
                    "`sampler` (default: the full 1000-step DDPM chain).")
    async def images_generations(body: ImageGenerationRequest, request: Request, rt: Runtime = Depends(runtime),
                                 owner: str | None = Depends(auth)):
        res = rt.weights.unet.config.image_size
        size = f"{res}x{res}"
        if body.model not in (None, "default", rt.weights.name):
            raise Invalid(f"model: this service serves {rt.weights.name!r} (or say 'default')")
        if body.size not in (None, "auto", size):
            raise Invalid(f"size: must be {size!r}, the model's resolution")
        req = GenerateRequest(n=body.n, seed=body.seed, sampler=body.sampler,
                              **({"steps": body.steps} if "steps" in body.model_fields_set else {}))
        seed, steps = check_limits(rt, req)
        every = max(1, steps // (body.partial_images + 1)) if body.stream and body.partial_images else 0
        job = new_job(rt, req, seed, steps, preview_every=every)
        record = submit(rt, job, owner, kind="request", client=request.client.host if request.client else None)
        # Subscribe before anything awaits: the worker's reports reach this loop only after, so none is missed.
        q = record.subscribe() if body.stream else None
        created = int(time.time())
        common = {"created_at": created, "size": size, "quality": "auto", "background": "opaque",
                  "output_format": "png"}
        if not body.stream:
            images = await wait_or_disconnect(request, rt, job)
            pngs = await run_in_threadpool(encode_pngs, rt, job, images)
            return ImagesResponse(created=created, data=[ImageData(b64_json=b64(p)) for p in pngs], size=size)

        async def events():
            sent: dict[int, int] = {}  # partial images sent, per image
            try:
                while True:
                    event = await q.get()
                    if event.kind == "preview":
                        index = event.data["index"]
                        if sent.get(index, 0) >= body.partial_images or event.data["step"] >= job.steps:
                            continue
                        png = await run_in_threadpool(png_bytes, event.image)
                        rt.metrics.previews.inc()
                        data = {"type": "image_generation.partial_image", "b64_json": b64(png),
                                "partial_image_index": sent.get(index, 0), **common}
                        sent[index] = sent.get(index, 0) + 1
                        yield f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"
                    elif event.kind == "completed":  # one event per image
                        for png in await run_in_threadpool(encode_pngs, rt, job, job.future.result()):
                            data = {"type": "image_generation.completed", "b64_json": b64(png), **common,
                                    "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                              "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}}
                            yield f"event: {data['type']}\ndata: {json.dumps(data)}\n\n"
                        return
                    elif event.kind in ("failed", "cancelled"):
                        data = {"type": "error", "error": {"message": event.data.get("detail", event.kind),
                                                            "type": event.data.get("reason", event.kind)}}
                        yield f"event: error\ndata: {json.dumps(data)}\n\n"
                        return
            finally:
                record.unsubscribe(q)
                if not job.future.done():  # the client left mid-stream: stop its work
                    rt.scheduler.cancel(job, JobError("disconnect", "client disconnected"))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
