"""Request and response bodies of the HTTP API (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from model.diffusion import Sampler as SamplerName  # model/diffusion.py's list, one place
from model.noise import SEED_LIMIT

# The engine takes seeds up to 2^63 - 1 (python -m model.sample does). Over HTTP a seed is a JSON number, and
# JavaScript clients (the page, browsers' JSON viewers) and most validators read those as doubles: exact only up to
# 2^53 - 1. So requests take, and random seeds are drawn, in [0, 2^53 - 1]; image i of a request uses seed + i.
MAX_SEED = min(2**53, SEED_LIMIT) - 1  # model/noise.py's seed rules, within JSON's exact integers


INT_FIELDS = {"n", "seed", "steps", "preview_every", "partial_images", "seed_a", "seed_b", "frames",
              "jump_length", "jump_n_sample"}


class _Request(BaseModel):
    """JSON Schema counts 4.0 as an integer: request bodies accept it as 4 (strings like "4" stay refused)."""

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data):
        if not isinstance(data, dict):
            return data
        return {k: int(v) if k in INT_FIELDS and isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v
                for k, v in data.items()}


class GenerateRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"n": 4, "seed": 7}, {"n": 1, "seed": 42, "sampler": "dpm-solver++", "steps": 25}]})

    n: StrictInt = Field(1, ge=1, description="number of images (1 to the configured maximum, default 16)")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED,
                                   description="image i uses seed + i; random when absent, always echoed")
    steps: StrictInt = Field(1000, ge=1, le=1000, description="denoising steps (1000: the full DDPM chain; when the "
                             "service sets MAX_STEPS lower, that is both the default and the limit)")
    sampler: SamplerName = Field("ddpm", description="reverse-process sampler")
    deadline_s: Optional[Annotated[float, Field(gt=0, le=3600, strict=True)]] = Field(
        None, description="give up (504) if the images are not done within this many seconds")


MAX_PREVIEWS = 100  # per image of a job


class JobRequest(GenerateRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"n": 4, "seed": 7, "preview_every": 50},
                     {"n": 1, "seed": 42, "sampler": "dpm-solver++", "steps": 25, "preview_every": 5}]})

    preview_every: StrictInt = Field(0, ge=0, le=1000, description="0: no previews; k: each image's estimate of x0 "
                                     f"after every k-th step and the last (at most {MAX_PREVIEWS} per image)")


class ImageGenerationRequest(_Request):
    """OpenAI's Images API (POST /v1/images/generations), for its clients. The model is unconditional: `prompt`
    is accepted and ignored. Extensions: seed, steps, sampler."""
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), json_schema_extra={"examples": [
        {"prompt": "a face", "n": 2, "seed": 7},
        {"prompt": "a face", "stream": True, "partial_images": 2, "seed": 7, "sampler": "dpm-solver++", "steps": 25}]})

    prompt: str = Field("", max_length=32000, description="ignored: the model is unconditional")
    model: Optional[str] = Field(None, description="the served model's name, or 'default'")
    n: StrictInt = Field(1, ge=1, description="number of images")
    size: Optional[str] = Field(None, description="WIDTHxHEIGHT; must be the model's resolution (or 'auto')")
    response_format: Optional[Literal["b64_json"]] = Field(
        None, description="b64_json (the default here; OpenAI's 'url' is not supported)")
    output_format: Optional[Literal["png"]] = Field(None, description="png")
    stream: StrictBool = Field(False, description="Server-Sent Events: partial images, then each completed image")
    partial_images: StrictInt = Field(0, ge=0, le=3, description="partial images to stream (x0 estimates)")
    quality: Optional[str] = Field(None, description="ignored")
    background: Optional[str] = Field(None, description="ignored")
    moderation: Optional[str] = Field(None, description="ignored")
    user: Optional[str] = Field(None, description="ignored")
    seed: Optional[StrictInt] = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i")
    steps: StrictInt = Field(1000, ge=1, le=1000, description="denoising steps")
    sampler: SamplerName = Field("ddpm", description="reverse-process sampler")


class ImageData(BaseModel):
    b64_json: str


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


class Image(BaseModel):
    seed: int
    png: str = Field(description="base64-encoded PNG with text chunks seed, sampler, steps, weights_sha256, model")


class Timings(BaseModel):
    queue_s: float = Field(description="from acceptance to the first denoising step")
    generate_s: float = Field(description="from the first denoising step to the last image")


class GenerateResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), json_schema_extra={"examples": [{
        "seed": 7, "model": "celeba32-cpu", "sampler": "ddpm", "steps": 1000,
        "images": [{"seed": 7, "png": "iVBORw0KGgo..."}], "timings": {"queue_s": 0.01, "generate_s": 14.2}}]})

    seed: int
    model: str
    sampler: str
    steps: int
    images: list[Image]
    timings: Timings


class ImageProgress(BaseModel):
    index: int
    seed: int
    step: int
    steps: int


class JobErrorInfo(BaseModel):
    reason: str
    detail: str


class JobInfo(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "pXcVn3m0Kq8yWl2JdK1R9A", "state": "running", "queue_position": None, "created": 1764444000,
        "n": 2, "seed": 7, "sampler": "ddpm", "steps": 1000, "preview_every": 50, "step": 640, "total_steps": 2000,
        "images_progress": [{"index": 0, "seed": 7, "step": 320, "steps": 1000},
                            {"index": 1, "seed": 8, "step": 320, "steps": 1000}],
        "eta_s": 4.1, "timings": None, "error": None, "images": None}]})

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    queue_position: Optional[int] = Field(description="0: next to start; null once running")
    created: int = Field(description="Unix time the job was accepted")
    n: int
    seed: int
    sampler: str
    steps: int
    preview_every: int
    step: int = Field(description="denoising steps done, all images together")
    total_steps: int = Field(description="n x steps")
    images_progress: list[ImageProgress]
    eta_s: Optional[float] = Field(description="seconds to the last image at the measured step time")
    timings: Optional[Timings] = None
    error: Optional[JobErrorInfo] = None
    images: Optional[list[Image]] = Field(None, description="when succeeded: as in /generate's JSON")


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    sha256: str
    resolution: int
    architecture: dict = Field(description="kind: unet (model/unet.py) or mp-unet (model/mp_unet.py), and its shape")
    parameters: int
    schedule: dict
    dataset: str
    training_steps: int
    device: str
    dtype: str
    runner: str
    spin_threads: str = Field(description="SPIN_THREADS on CPU: true, false, or auto (spinning ONNX Runtime threads "
                              "for a batch smaller than the cores while no other process uses them)")
    samplers: list[str]
    max_n: int
    max_batch: int
    source_scheduler: Optional[dict] = Field(
        None, description="a converted diffusers checkpoint's own scheduler settings (e.g. variance_type, "
                          "clip_sample); this service samples with the sampler a request names")
    auth_required: bool = Field(description="the generation and job routes need an API key")


class Error(BaseModel):
    detail: str


ERRORS = {
    401: {"model": Error, "description": "missing or wrong API key (when keys are configured)"},
    413: {"model": Error, "description": "request body too large"},
    429: {"model": Error, "description": "over this caller's rate limit (RATE_LIMIT_REQUESTS / _IMAGES); see "
                                         "Retry-After"},
    422: {"model": Error, "description": "invalid request: unknown field, wrong type or value out of range"},
    503: {"model": Error, "description": "queue or job store full, shutting down, out of GPU memory, or the "
                                         "denoising worker failed; see Retry-After"},
    504: {"model": Error, "description": "the request's deadline passed"},
}
JOB_ERRORS = {404: {"model": Error, "description": "no such job, another key's job, or expired"},
              401: ERRORS[401], 422: ERRORS[422]}

# The HTTP status for each reason a job is refused or ends without images (service/scheduler.py's JobError).
REASON_STATUS = {
    "rate_limited": 429, "queue_full": 503, "store_full": 503, "shutting_down": 503, "shutdown": 503,
    "worker_failed": 503, "oom": 503,
    "deadline": 504, "failed": 500, "non_finite": 500, "cancelled": 409, "disconnect": 499, "server_cancelled": 503,
}


class EditRequest(GenerateRequest):
    """POST /v1/edits as JSON (or the same fields as multipart/form-data, with `image` and `mask` as files)."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"image": "<base64 JPEG or PNG>", "strength": 0.5, "n": 2, "seed": 7, "sampler": "ddim", "steps": 50},
        {"image": "<base64 photo>", "mask": "<base64 PNG: white = repaint>", "n": 1, "seed": 7}]})

    image: str = Field(max_length=28_000_000, description="the face photo, base64 (JPEG, PNG, WebP, BMP); framed "
                       "like the training data and resized to the model's resolution")
    mask: Optional[str] = Field(None, max_length=28_000_000, description="inpainting mask, base64, the photo's "
                                "size: white = repaint, black = keep")
    strength: Optional[Annotated[float, Field(gt=0, le=1, strict=True)]] = Field(
        None, description="image-to-image: how far to move from the photo, 0 < s <= 1 (default 0.5; with a mask 1)")
    steps: Optional[StrictInt] = Field(None, ge=1, le=1000, description="denoising steps (default: every step of "
                                       "the chain for ddpm and ddpm-posterior, 50 otherwise)")
    jump_length: StrictInt = Field(1, ge=1, le=100, description="inpainting: RePaint's resampling, go back up this "
                                   "many steps ... (1: no resampling)")
    jump_n_sample: StrictInt = Field(1, ge=1, le=20, description="... this many times in all at every jump_length-th "
                                     "step (RePaint's 10 and 10 cost about 10x the steps)")
    job: StrictBool = Field(False, description="true: answer 202 at once with a job handle (/v1/jobs/{id}: events, "
                            "previews, images, cancel) instead of the images")
    preview_every: StrictInt = Field(0, ge=0, le=1000, description="with `job`: previews every k-th step")


class EditResponse(GenerateResponse):
    mode: Literal["img2img", "inpaint"]
    strength: float
    framing: str = Field(description="what was done to the photo to fit the model")


class InterpolationRequest(_Request):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"seed_a": 3, "seed_b": 11,
                                                                               "frames": 8}]})

    seed_a: StrictInt = Field(ge=0, le=MAX_SEED, description="the first frame is this seed's face")
    seed_b: StrictInt = Field(ge=0, le=MAX_SEED, description="the last frame is this seed's face")
    frames: StrictInt = Field(8, ge=2, le=16, description="frames along the path, both ends included")
    steps: StrictInt = Field(50, ge=1, le=1000, description="DDIM steps per frame")


class Frame(BaseModel):
    index: int
    png: str = Field(description="base64-encoded PNG")


class InterpolationResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    seed_a: int
    seed_b: int
    steps: int
    frames: list[Frame]
    timings: Timings
