"""Operations routes: /metrics for Prometheus, /healthz and /readyz for probes, /v1/model."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from model.device import DTYPE_NAMES
from model.diffusion import SAMPLERS
from model.unet import count_parameters

from .deps import runtime
from .runtime import Runtime
from .schemas import ModelInfo
from .settings import Settings


def ops_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    auth_required = bool(settings.keys())

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def metrics(rt: Runtime = Depends(runtime)):
        return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/healthz", summary="The process and its denoising worker are alive",
                responses={503: {"description": "the denoising worker died: restart the process"}})
    async def healthz(rt: Runtime = Depends(runtime)):
        if not rt.healthy():
            return JSONResponse({"status": "denoising worker failed"}, status_code=503)
        return {"status": "ok"}

    @router.get("/readyz", summary="Weights loaded, warmed up and admitting requests",
                responses={503: {"description": "not ready (starting, shutting down, or the worker failed)"}})
    async def readyz(rt: Runtime = Depends(runtime)):
        if not rt.ready or not rt.scheduler.alive():
            return JSONResponse({"status": "not ready"}, status_code=503)
        queued, active = rt.scheduler.depth()
        return {"status": "ready", "queued_requests": queued, "active_samples": active}

    @router.get("/v1/model", response_model=ModelInfo, summary="The served model")
    async def model_info(rt: Runtime = Depends(runtime)):
        w, cfg = rt.weights, rt.weights.unet.config
        return ModelInfo(name=w.name, sha256=w.sha256, resolution=cfg.image_size,
                         architecture={"kind": w.metadata.get("architecture", "unet"), **cfg.to_dict()},
                         parameters=count_parameters(rt.engine.unet), schedule=w.diffusion.config.to_dict(),
                         dataset=w.metadata.get("dataset", ""), training_steps=int(w.metadata["training_steps"]),
                         device=str(rt.engine.device), dtype=DTYPE_NAMES[rt.engine.dtype],
                         runner=rt.engine.runner.mode, spin_threads=str(rt.engine.runner.spin).lower(),
                         samplers=list(SAMPLERS), max_n=settings.max_n,
                         max_batch=rt.scheduler.max_batch, auth_required=auth_required,
                         source_scheduler=json.loads(w.metadata["source_scheduler"])
                         if "source_scheduler" in w.metadata else None)

    return router
