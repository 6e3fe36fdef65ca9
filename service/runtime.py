"""What the app serves with: the weights, the engine on its device, the scheduler and the metrics, built once at
start-up from the settings; and the one owner of shutdown (`drain`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from model.device import DTYPE_NAMES, pick_device, pick_dtype
from model.engine import SamplerEngine
from model.weights import LoadedWeights, load_weights

from .jobs import JobStore
from .limits import RateLimits
from .metrics import Metrics
from .scheduler import STATES, Scheduler
from .settings import Settings

log = logging.getLogger("celeba_ddpm.service")


@dataclass
class Runtime:
    settings: Settings
    weights: LoadedWeights
    engine: SamplerEngine
    scheduler: Scheduler
    metrics: Metrics
    store: JobStore
    rate_limits: RateLimits
    ready: bool = False

    def drain(self, grace_s: float | None = None) -> threading.Thread:
        """Report not ready and stop admitting now; in-flight work gets grace_s (default SHUTDOWN_GRACE_S) to
        finish, then is failed with 503. Idempotent: SIGTERM and the app's shutdown both call it."""
        self.ready = False
        return self.scheduler.drain(self.settings.shutdown_grace_s if grace_s is None else grace_s)

    def healthy(self) -> bool:
        """The denoising worker is alive (or was stopped on purpose): what a liveness probe asks."""
        return self.scheduler.healthy()


def build_runtime(settings: Settings, weights: LoadedWeights | None = None,
                  on_fatal: Callable[[BaseException], None] | None = None) -> Runtime:
    """Everything but starting the worker. on_fatal: called (on the worker thread) if the worker dies."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    weights = weights or load_weights(settings.weights_path(device))
    engine = SamplerEngine(weights.unet, weights.diffusion, device, dtype, memory_format=settings.memory_format,
                           runner=settings.runner, workers=settings.threads,
                           cache_dir=settings.cache_dir, spin=settings.spin_threads)
    metrics = Metrics()
    metrics.model.info({"name": weights.name, "sha256": weights.sha256,
                        "resolution": str(weights.unet.config.image_size), "device": str(device),
                        "dtype": DTYPE_NAMES[dtype], "runner": engine.runner.mode})
    metrics.gpu_memory.set_function(engine.memory_allocated)  # read at scrape time, never on the step path
    rt: Runtime | None = None

    def fatal(exc: BaseException) -> None:
        if rt is not None:
            rt.ready = False
        if on_fatal is not None:
            on_fatal(exc)

    scheduler = Scheduler(engine, metrics, settings.max_batch, settings.queue_size, warm_up=settings.warmup,
                          on_fatal=fatal, malloc_trim_s=settings.malloc_trim_s)
    store = JobStore(settings.max_jobs, settings.job_ttl_s)
    for state in STATES:
        metrics.jobs.labels(state).set_function(lambda state=state: store.count(state))  # at scrape time
    rt = Runtime(settings, weights, engine, scheduler, metrics, store,
                 RateLimits(settings.rate_limit_requests, settings.rate_limit_images))
    return rt
