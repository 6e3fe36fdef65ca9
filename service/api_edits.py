"""Editing routes: POST /v1/edits (image-to-image and inpainting of a face photo, like OpenAI's /v1/images/edits)
and POST /v1/interpolations (a smooth path between two seeds' faces). The maths is model/edit.py's; each image is
a row of the same batch as every other request."""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from PIL import Image as PILImage
from PIL import UnidentifiedImageError
from pydantic import ValidationError

from model.diffusion import STOCHASTIC, repaint_path
from model.edit import MAX_PIXELS, interpolation_starts, mask_to_keep, to_model
from model.images import auto_framing, frame, frame_box, grid, png_bytes

from .api_jobs import job_info
from .deps import (Invalid, b64, encode_grid, encode_pngs, job_timings, max_seed, max_steps, runtime, submit,
                   wait_or_disconnect)
from .runtime import Runtime
from .scheduler import Job
from .schemas import (ERRORS, EditRequest, EditResponse, Frame, Image, InterpolationRequest, InterpolationResponse,
                      JobInfo)


FORMATS = {"JPEG", "PNG", "WEBP", "BMP"}  # what Pillow reads that a photo or a mask should come as


class TooLarge(Exception):
    """An upload over the pixel limit (413)."""


def _open(data: bytes, what: str) -> PILImage.Image:
    try:
        img = PILImage.open(io.BytesIO(data))
    except PILImage.DecompressionBombError as e:  # Pillow's own limit, far above ours: also too large
        raise TooLarge(f"{what}: {e}") from e
    except (UnidentifiedImageError, OSError) as e:
        raise Invalid(f"{what}: not an image this service reads (JPEG, PNG, WebP, BMP): {e}") from e
    if img.format not in FORMATS:
        raise Invalid(f"{what}: {img.format} is not a format this service takes (JPEG, PNG, WebP, BMP)")
    if img.width * img.height > MAX_PIXELS:
        raise TooLarge(f"{what}: {img.width}x{img.height} is over the {MAX_PIXELS} pixels accepted (4096x4096)")
    return img


def prepare(image: bytes, mask: bytes | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """(3xSxS image in [-1, 1], 1xSxS keep mask or None, what was done): framed like the training data."""
    img = _open(image, "image")
    try:
        pixels = frame(img, size)
        keep = None
        if mask is not None:
            m = _open(mask, "mask")
            if m.size != img.size:
                raise Invalid(f"mask: {m.width}x{m.height}, but the image is {img.width}x{img.height}")
            keep = mask_to_keep(m, size)
            if keep.all():
                raise Invalid("mask: it marks nothing to repaint (white = repaint, black = keep)")
    except (OSError, ValueError) as e:  # truncated or corrupt pixel data, found while decoding
        raise Invalid(f"image: cannot decode it: {e}") from e
    framing = auto_framing(img.width, img.height)
    box = frame_box(img.width, img.height, framing)
    kind = "the CelebA face box" if framing == "celeba" else "the centre square"
    described = (f"{img.width}x{img.height} {img.format or 'image'}: cropped to {kind} "
                 f"({box[0]:.1f}, {box[1]:.1f})-({box[2]:.1f}, {box[3]:.1f}), resized to {size}x{size}")
    return to_model(pixels), keep, described


def _b64(text: str | None, what: str) -> bytes | None:
    if text is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Invalid(f"{what}: not valid base64 ({e})") from e


async def parse_edit(request: Request) -> tuple[EditRequest, bytes, bytes | None]:
    """The request as JSON (image and mask base64) or multipart/form-data (image and mask as files)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=2, max_fields=20)
        except Exception as e:  # python-multipart's parse errors
            raise Invalid(f"body: not valid multipart/form-data ({e})") from e
        files, fields = {}, {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                files[key] = await value.read()
            else:
                try:
                    fields[key] = json.loads(value)  # "4" -> 4, "0.5" -> 0.5, "true" -> True
                except ValueError:
                    fields[key] = value  # "ddim"
        if "image" not in files:
            raise Invalid("image: required, as a file field")
        fields.pop("image", None)
        fields.pop("mask", None)
        body = _validated({**fields, "image": ""})
        return body, files["image"], files.get("mask")
    if not kind.startswith("application/json"):
        raise Invalid("body: send application/json (image and mask base64) or multipart/form-data (files)")
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError) as e:
        raise Invalid(f"body: not valid JSON ({e})") from e
    body = _validated(data)
    return body, _b64(body.image, "image"), _b64(body.mask, "mask")


def _validated(data) -> EditRequest:
    """The body parsed by hand (two content types), its errors answered like any route's (errors.py)."""
    try:
        return EditRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e


def edits_router(auth) -> APIRouter:
    router = APIRouter()
    schema = EditRequest.model_json_schema()  # inline: no route takes it as a parsed body, so no component

    @router.post("/v1/edits", response_model=EditResponse, summary="Edit a face photo",
                 responses={200: {"content": {"image/png": {}}, "description": "JSON, or with `Accept: image/png` "
                                  "one PNG (the image when n = 1, else a grid)"},
                            202: {"model": JobInfo, "description": "with `job`: the job's handle"},
                            413: {"description": "image over 4096x4096 pixels, or body over MAX_UPLOAD_BYTES"},
                            **ERRORS},
                 description="Image-to-image (SDEdit: the photo noised to strength x T and denoised) or, with a "
                             "mask, inpainting (RePaint: white pixels redrawn, black kept exactly). The photo is "
                             "framed like the training data (the CelebA box for 178x218 photos, else the centre "
                             "square) and resized to the model's resolution; `framing` says what was done. As JSON "
                             "with base64 `image`/`mask`, or as multipart/form-data with files, like OpenAI's "
                             "/v1/images/edits. With `job: true` it answers 202 with a job handle (/v1/jobs/{id}).",
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": schema},
                     "multipart/form-data": {"schema": {
                         "type": "object", "required": ["image"], "properties": {
                             "image": {"type": "string", "format": "binary"},
                             "mask": {"type": "string", "format": "binary"},
                             "strength": {"type": "number"}, "n": {"type": "integer"},
                             "seed": {"type": "integer"}, "sampler": {"type": "string"},
                             "steps": {"type": "integer"}}}}}}})
    async def edits(request: Request, rt: Runtime = Depends(runtime), owner: str | None = Depends(auth)):
        body, image, mask = await parse_edit(request)
        if body.n > rt.settings.max_n:
            raise Invalid(f"n: must be at most {rt.settings.max_n}")
        seed = body.seed if body.seed is not None else secrets.randbelow(max_seed(rt) + 1)
        if seed > max_seed(rt):
            raise Invalid(f"seed: must be at most {max_seed(rt)}")
        if body.preview_every and not body.job:
            raise Invalid("preview_every: previews come through a job (`job`: true)")
        size = rt.weights.unet.config.image_size
        try:
            x0, keep, framing = await run_in_threadpool(prepare, image, mask, size)
        except TooLarge as e:
            rt.metrics.rejected.labels("image_too_large").inc()
            return JSONResponse({"detail": str(e)}, status_code=413)
        strength = body.strength if body.strength is not None else (1.0 if keep is not None else 0.5)
        t_max = rt.weights.diffusion.t_max_for_strength(strength)
        chain = min(t_max + 1, max_steps(rt))
        steps = body.steps if body.steps is not None else (chain if body.sampler in STOCHASTIC else min(50, chain))
        if steps > chain:
            raise Invalid(f"steps: at most {chain} for strength {strength} (the chain from t = {t_max} to 0"
                          + (f", and MAX_STEPS {max_steps(rt)})" if chain < t_max + 1 else ")"))
        jumps = (body.jump_length, body.jump_n_sample)
        if jumps != (1, 1) and (keep is None or body.sampler not in STOCHASTIC):
            raise Invalid("jump_length, jump_n_sample: RePaint's resampling is for inpainting (a mask) with a "
                          "stochastic sampler (ddpm, ddpm-posterior)")
        transitions = len(repaint_path(steps, *jumps)) - 1  # the engine steps each image takes
        if transitions > 20 * max_steps(rt):
            raise Invalid(f"jump_length, jump_n_sample: {transitions} steps per image, over the {20 * max_steps(rt)} "
                          "allowed")
        timeout = body.deadline_s or rt.settings.request_timeout_s
        job = Job(seed, body.n, body.sampler, transitions, deadline=time.monotonic() + timeout if timeout else None,
                  preview_every=body.preview_every, t_max=t_max, image=x0, keep=keep, jumps=jumps, chain_steps=steps)
        client = request.client.host if request.client else None
        if body.job:
            record = submit(rt, job, owner, kind="job", client=client)
            info = await job_info(rt, record)
            return JSONResponse(info.model_dump(mode="json"), status_code=202,
                                headers={"Location": f"/v1/jobs/{record.id}"})
        submit(rt, job, owner, kind="request", client=client)
        images = await wait_or_disconnect(request, rt, job)
        timings = job_timings(job)
        if "image/png" in request.headers.get("accept", ""):
            content = await run_in_threadpool(encode_grid, rt, job, images)
            return Response(content, media_type="image/png", headers={"X-Seed": str(seed),
                                                                      "X-Framing": framing})
        pngs = await run_in_threadpool(encode_pngs, rt, job, images)
        return EditResponse(seed=seed, model=rt.weights.name, sampler=body.sampler, steps=steps,
                            images=[Image(seed=seed + i, png=b64(p)) for i, p in enumerate(pngs)],
                            timings=timings, mode="inpaint" if keep is not None else "img2img",
                            strength=strength, framing=framing)

    @router.post("/v1/interpolations", response_model=InterpolationResponse, summary="Faces between two seeds",
                 responses={200: {"content": {"image/png": {}}, "description": "JSON, or with `Accept: image/png` "
                                  "one PNG strip of the frames"}, **ERRORS},
                 description="x_T of each frame is the spherical interpolation of the two seeds' x_T, sampled with "
                             "deterministic DDIM (Song et al. 2021): the first and last frames are what /generate "
                             "gives for the two seeds with sampler ddim and these steps.")
    async def interpolations(body: InterpolationRequest, request: Request, rt: Runtime = Depends(runtime),
                             owner: str | None = Depends(auth)):
        steps = body.steps if "steps" in body.model_fields_set else min(50, max_steps(rt))
        if steps > max_steps(rt):
            raise Invalid(f"steps: must be at most {max_steps(rt)}")
        cfg = rt.weights.unet.config
        starts = interpolation_starts(body.seed_a, body.seed_b, body.frames,
                                      (cfg.in_channels, cfg.image_size, cfg.image_size))
        timeout = rt.settings.request_timeout_s
        job = Job(body.seed_a, body.frames, "ddim", steps, x_starts=starts,
                  deadline=time.monotonic() + timeout if timeout else None)
        submit(rt, job, owner, kind="request", client=request.client.host if request.client else None)
        frames = await wait_or_disconnect(request, rt, job)
        timings = job_timings(job)

        def encode() -> list[bytes]:
            return [png_bytes(f, {"seed_a": str(body.seed_a), "seed_b": str(body.seed_b), "frame": str(j),
                                  "frames": str(body.frames), "sampler": "ddim", "steps": str(steps),
                                  "weights_sha256": rt.weights.sha256, "model": rt.weights.name})
                    for j, f in enumerate(frames)]

        if "image/png" in request.headers.get("accept", ""):
            strip = await run_in_threadpool(lambda: png_bytes(grid(np.asarray(frames), len(frames))))
            return Response(strip, media_type="image/png")
        pngs = await run_in_threadpool(encode)
        return InterpolationResponse(model=rt.weights.name, seed_a=body.seed_a, seed_b=body.seed_b,
                                     steps=steps, frames=[Frame(index=j, png=b64(p)) for j, p in
                                                               enumerate(pngs)], timings=timings)

    return router
