"""Request and response bodies of the HTTP API (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"n": 4, "seed": 7}, {"n": 1, "seed": 42, "sampler": "dpm-solver++", "steps": 25}]})

    n: StrictInt = Field(1, ge=1, description="number of images (1 to the configured maximum, default 16)")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED,
                                   description="image i uses seed + i; random when absent, always echoed")
    steps: StrictInt = Field(1000, ge=1, le=1000, description="denoising steps (1000: the full DDPM chain)")
    sampler: Literal["ddpm", "ddim", "dpm-solver++"] = Field("ddpm", description="reverse-process sampler")
    deadline_s: StrictFloat | StrictInt | None = Field(
        None, gt=0, le=3600, description="give up (504) if the images are not done within this many seconds")


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


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    sha256: str
    resolution: int
    architecture: dict
    parameters: int
    schedule: dict
    dataset: str
    training_steps: int
    device: str
    dtype: str
    runner: str
    samplers: list[str]
    max_n: int
    max_batch: int


class Error(BaseModel):
    detail: str


ERRORS = {
    401: {"model": Error, "description": "missing or wrong API key (when one is configured)"},
    413: {"model": Error, "description": "request body too large"},
    422: {"model": Error, "description": "invalid request: unknown field, wrong type or value out of range"},
    503: {"model": Error, "description": "queue full, shutting down, or out of GPU memory; see Retry-After"},
    504: {"model": Error, "description": "the request's deadline passed"},
}
