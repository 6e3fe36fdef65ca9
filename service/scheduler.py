"""Step-level continuous batching: one worker thread owns the sampler engine (and so the device).

Requests wait in a bounded FIFO queue. Between two denoising steps the worker applies cancellations and
deadlines, then admits samples from the head of the queue while the batch has room (a request larger than the
room is admitted in parts), runs one step for the whole batch, and hands each request its images as soon as its
last one is done. The event loop only touches the queue under a short lock and awaits a future, so it never
blocks on the device. Mirrors vLLM's split: this module schedules; model/engine.py runs the model.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from model.engine import SampleSpec, SamplerEngine

from .metrics import Metrics

log = logging.getLogger("celeba_ddpm.scheduler")


class GenerationError(Exception):
    """A request that could not be served; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, retry_after: int | None = None, reason: str = "error"):
        super().__init__(message)
        self.status, self.message, self.retry_after, self.reason = status, message, retry_after, reason


@dataclass
class Job:
    seed: int
    n: int
    sampler: str
    steps: int
    deadline: float | None = None  # time.monotonic() by which it must finish
    id: int = field(default_factory=itertools.count().__next__)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    admitted: int = 0
    images: dict[int, np.ndarray] = field(default_factory=dict)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None

    def specs(self, start: int, count: int) -> list[SampleSpec]:
        return [SampleSpec(self.seed + i, self.sampler, self.steps) for i in range(start, start + count)]


class Scheduler:
    def __init__(self, engine: SamplerEngine, metrics: Metrics, max_batch: int, queue_size: int):
        self.engine, self.metrics = engine, metrics
        self.max_batch, self.queue_size = max_batch, queue_size
        self._pending: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._cancel: dict[int, tuple[Job, GenerationError, str]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self.draining = False
        self._step_s = 0.0  # moving average of the step time
        self._thread = threading.Thread(target=self._run, name="denoiser", daemon=True)
        metrics.batch_limit.set(max_batch)

    # ---- called from the event loop ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self.draining:
                raise GenerationError(503, "the service is shutting down", retry_after=5, reason="shutting_down")
            if len(self._pending) >= self.queue_size:
                raise GenerationError(503, f"queue full ({self.queue_size} requests waiting); retry later",
                                      retry_after=max(1, int(self.estimate_wait_s())), reason="queue_full")
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return job.future

    def cancel(self, job: Job, error: GenerationError, reason: str) -> None:
        """Drop a job's samples (waiting or running) before the next step; its future fails with `error`."""
        with self._cond:
            if not job.future.done():
                self._cancel[job.id] = (job, error, reason)
                self._cond.notify()

    def estimate_wait_s(self) -> float:
        """Rough time until the queue drains: 1000-step batches at the recent step time (for Retry-After)."""
        return min(600.0, self._step_s * 1000 * (1 + len(self._pending) / self.max_batch))

    def depth(self) -> tuple[int, int]:
        return len(self._pending), len(self.engine)

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop admitting; let running work finish for up to grace_s; fail what is left with 503; end the worker."""
        with self._cond:
            self.draining = True
        end = time.monotonic() + grace_s
        while time.monotonic() < end:
            with self._cond:
                if not self._pending and not self._active:
                    break
            time.sleep(0.05)
        with self._cond:
            err = GenerationError(503, "the service shut down before this request finished")
            for job in list(self._pending) + list(self._active.values()):
                self._cancel[job.id] = (job, err, "shutdown")
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ---- the worker thread ---------------------------------------------------------------------------------
    def _fail(self, job: Job, error: GenerationError) -> None:
        if not job.future.done():
            job.future.set_exception(error)

    def _apply_cancellations(self) -> None:
        now = time.monotonic()
        for job in list(self._pending) + list(self._active.values()):
            if job.deadline is not None and now > job.deadline and job.id not in self._cancel:
                self._cancel[job.id] = (job, GenerationError(504, "request deadline passed before it finished"),
                                        "deadline")
        for job_id, (job, error, reason) in self._cancel.items():
            if job in self._pending:
                self._pending.remove(job)
            self._active.pop(job_id, None)
            self.engine.cancel(job_id)
            self.metrics.cancelled.labels(reason).inc()
            self._fail(job, error)
        self._cancel.clear()

    def _admit(self) -> None:
        while self._pending and len(self.engine) < self.max_batch:
            job = self._pending[0]
            k = min(job.n - job.admitted, self.max_batch - len(self.engine))
            self.engine.add(job.id, job.specs(job.admitted, k), first_index=job.admitted)
            if job.admitted == 0:
                job.started_at = time.monotonic()
                self.metrics.queue_wait.observe(job.started_at - job.enqueued_at)
                self._active[job.id] = job
            job.admitted += k
            if job.admitted == job.n:
                self._pending.popleft()
        self.metrics.queue_depth.set(len(self._pending))

    def _run(self) -> None:
        while True:
            with self._cond:
                self._apply_cancellations()
                if self._stop:
                    return
                self._admit()
                if not len(self.engine):
                    self.metrics.active.set(0)
                    self._cond.wait(timeout=0.5)
                    continue
            self._step()

    def _step(self) -> None:
        m, batch = self.metrics, len(self.engine)
        m.active.set(batch)
        t0 = time.perf_counter()
        try:
            finished = self.engine.step()
        except torch.OutOfMemoryError:
            self._on_oom(batch)
            return
        except Exception as e:  # a bug or device fault: fail this batch, keep serving
            log.exception("denoising step failed")
            self._fail_batch(GenerationError(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        dt = time.perf_counter() - t0
        self._step_s = dt if not self._step_s else 0.95 * self._step_s + 0.05 * dt
        m.step_duration.observe(dt)
        m.batch_size.observe(batch)
        m.steps.inc()
        m.sample_steps.inc(batch)
        if self.engine.device.type == "cuda":
            m.gpu_memory.set(torch.cuda.memory_allocated(self.engine.device))
        for job_id, index, image in finished:
            job = self._active.get(job_id)
            if job is None:
                continue
            job.images[index] = image
            m.images.inc()
            if len(job.images) == job.n:
                job.finished_at = time.monotonic()
                m.generation.observe(job.finished_at - job.started_at)
                del self._active[job_id]
                if not job.future.done():
                    job.future.set_result(np.stack([job.images[i] for i in range(job.n)]))

    def _fail_batch(self, error: GenerationError) -> None:
        with self._cond:
            for job_id in list(self.engine.groups()):
                self.engine.cancel(job_id)
                job = self._active.pop(job_id, None)
                if job is not None:
                    if job in self._pending:
                        self._pending.remove(job)
                    self._fail(job, error)

    def _on_oom(self, batch: int) -> None:
        self.metrics.oom.inc()
        new_limit = max(1, min(self.max_batch, batch) // 2)
        log.error("out of memory at batch %d: failing its requests, batch limit %d -> %d",
                  batch, self.max_batch, new_limit)
        self._fail_batch(GenerationError(503, f"out of GPU memory at batch size {batch}; the batch limit is now "
                                              f"{new_limit}, retry", retry_after=1))
        self.max_batch = new_limit
        self.metrics.batch_limit.set(new_limit)
        if self.engine.device.type == "cuda":
            torch.cuda.empty_cache()
