"""Step-level continuous batching: one worker thread owns the sampler engine (and so the device).

Requests wait in a bounded FIFO queue. Between two denoising steps the worker applies cancellations and
deadlines, then admits samples from the head of the queue while the batch has room (a request larger than the
room is admitted in parts), runs one step for the whole batch, and hands each request its images as soon as its
last one is done. Mirrors vLLM's split: this module schedules; model/engine.py runs the model.

The lock guards only host bookkeeping (the queue, the job table). The worker decides under it and touches the
device outside it, so `submit()` and `cancel()` on the event loop never wait for the GPU.

Failures: an out-of-memory step fails the batch's requests, halves the batch limit and goes on; any other error
in a step fails the batch's requests and goes on; a device fault (model/device.py: the GPU is unusable until the
process restarts) or an error in the scheduler itself fails every request, waiting or running, marks the worker
dead (`alive()` is False, so /healthz and /readyz say 503) and calls `on_fatal` so the process can exit for its
orchestrator to restart it. No request is ever left waiting on a dead worker.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from model.device import StepTimer, is_device_fault
from model.engine import Edit, SampleSpec, SamplerEngine
from model.noise import image_seeds

from .memory import HeapTrimmer
from .metrics import Metrics

log = logging.getLogger("celeba_ddpm.scheduler")


STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
CANCELLED = ("cancelled", "disconnect", "server_cancelled")  # reasons that end a job as cancelled, not failed


class JobError(Exception):
    """Why a job was refused or ended without its images. `reason` is a word the API maps to an HTTP status
    (service/errors.py, by schemas.REASON_STATUS); `retry_after` (seconds) where trying again later can work.
    Refused: queue_full, store_full, shutting_down, worker_failed. Ended: deadline, shutdown (past the drain's
    grace), oom, failed (an error in a step), non_finite (an image came out NaN/Inf), worker_failed, and, as
    cancelled: cancelled (DELETE), disconnect, server_cancelled."""

    def __init__(self, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.reason, self.message, self.retry_after = reason, message, retry_after


@dataclass(eq=False)  # a job is itself: compared and hashed by identity
class Job:
    """One request: n images, seeds seed..seed+n-1. The scheduler sets state, steps_done, position and error, and
    reports to `listener(kind, **data)` from the denoising thread: queued (queue_position), running, progress,
    preview (index, step, image), then succeeded, failed or cancelled."""
    seed: int
    n: int
    sampler: str
    steps: int
    deadline: float | None = None  # time.monotonic() by which it must finish
    preview_every: int = 0
    listener: Callable[..., None] | None = None
    t_max: int | None = None  # an image-to-image edit's first timestep (model/edit.py); None: T-1
    image: torch.Tensor | None = None  # an edit's input (3xHxW in [-1, 1]): start and/or known pixels
    keep: torch.Tensor | None = None  # 1xHxW bool, True where the input's pixels are kept (inpainting)
    x_starts: list[torch.Tensor] | None = None  # per image, the exact x to start from (interpolation)
    jumps: tuple[int, int] = (1, 1)  # RePaint's resampling; then `steps` counts its forward steps too ...
    chain_steps: int | None = None  # ... and this is the sampler's own step count
    id: int = field(default_factory=itertools.count().__next__)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    state: str = "queued"
    position: int | None = None  # place in the queue while queued
    error: JobError | None = None
    admitted: int = 0
    steps_done: list[int] = field(default_factory=list)  # per image
    step_s: float = 0.0  # the batch's recent step time, for ETAs
    images: dict[int, np.ndarray] = field(default_factory=dict)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self) -> None:
        self.steps_done = [0] * self.n

    def specs(self, start: int, count: int) -> list[SampleSpec]:
        return [SampleSpec(seed, self.sampler, self.chain_steps or self.steps, self.preview_every, self.t_max,
                           self.jumps) for seed in image_seeds(self.seed, self.n)[start:start + count]]

    def edits(self, start: int, count: int) -> list[Edit | None] | None:
        if self.x_starts is not None:
            return [Edit(x_start=self.x_starts[i]) for i in range(start, start + count)]
        if self.image is not None:
            return [Edit(image=self.image, keep=self.keep)] * count
        return None

    def steps_done_total(self) -> int:
        return sum(self.steps_done)

    def notify(self, kind: str, **data) -> None:
        if self.listener is not None:
            try:
                self.listener(kind, **data)
            except Exception:  # a listener's bug must not stop the denoising thread
                log.exception("job listener failed")


class Scheduler:
    def __init__(self, engine: SamplerEngine, metrics: Metrics, max_batch: int, queue_size: int,
                 warm_up: bool = True, on_fatal: Callable[[BaseException], None] | None = None,
                 malloc_trim_s: float = 0.0):
        self.engine, self.metrics = engine, metrics
        self.heap = HeapTrimmer(malloc_trim_s)  # service/memory.py: freed heap pages back to the OS
        self.max_batch, self.queue_size = max_batch, queue_size
        self.warm_up, self.on_fatal = warm_up, on_fatal
        self._pending: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._cancel: dict[int, tuple[Job, JobError]] = {}
        self._cond = threading.Condition()
        self._stop = False
        self.draining = False
        self._drain_thread: threading.Thread | None = None
        self.fatal: BaseException | None = None  # what killed the worker
        self.started = threading.Event()  # set when warm-up is over (or the worker died)
        self._step_s = 0.0  # moving average of the step time
        self._timer = StepTimer(engine.device)
        self._thread = threading.Thread(target=self._run, name="denoiser", daemon=True)
        metrics.batch_limit.set(max_batch)

    # ---- called from the event loop ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker; it warms up first (`started` is set when it has)."""
        self._thread.start()

    def alive(self) -> bool:
        """The worker is running and admitting work."""
        return self._thread.is_alive() and self.fatal is None

    def healthy(self) -> bool:
        """Not dead of an error: running, or not started yet, or stopped on purpose."""
        return self.fatal is None and (self._thread.is_alive() or not self.started.is_set() or self._stop)

    def submit(self, job: Job) -> concurrent.futures.Future:
        with self._cond:
            if self.fatal is not None:
                raise JobError("worker_failed", "the denoising worker failed; the service is restarting",
                               retry_after=10)
            if self.draining:
                raise JobError("shutting_down", "the service is shutting down", retry_after=5)
            if len(self._pending) >= self.queue_size:
                raise JobError("queue_full", f"queue full ({self.queue_size} requests waiting); retry later",
                               retry_after=max(1, int(self.estimate_wait_s())))
            self._pending.append(job)
            self._queue_gauges()
            job.position = len(self._pending) - 1
            job.notify("queued", queue_position=job.position)
            self._cond.notify()
        return job.future

    def cancel(self, job: Job, error: JobError) -> None:
        """Drop a job's samples (waiting or running) before the next step; its future fails with `error`."""
        with self._cond:
            if not job.future.done():
                self._cancel[job.id] = (job, error)
                self._cond.notify()

    def estimate_wait_s(self) -> float:
        """Rough time until the queue drains: 1000-step batches at the recent step time (for Retry-After)."""
        return min(600.0, self._step_s * 1000 * (1 + len(self._pending) / self.max_batch))

    def depth(self) -> tuple[int, int]:
        return len(self._pending), len(self.engine)

    def drain(self, grace_s: float) -> threading.Thread:
        """Stop admitting now; let running work finish for up to grace_s, then fail what is left with 503 and end
        the worker. Idempotent: a second call returns the thread of the first (join it to wait for the end)."""
        with self._cond:
            if self._drain_thread is None:
                self.draining = True
                self._drain_thread = threading.Thread(target=self._drain, args=(grace_s,), name="drain",
                                                      daemon=True)
                self._drain_thread.start()
            return self._drain_thread

    def stop(self, grace_s: float = 0.0) -> None:
        """drain(grace_s) and wait for it."""
        self.drain(grace_s).join()

    def _drain(self, grace_s: float) -> None:
        end = time.monotonic() + grace_s
        while time.monotonic() < end and self.alive():
            with self._cond:
                if not self._pending and not self._active:
                    break
            time.sleep(0.05)
        with self._cond:
            err = JobError("shutdown", "the service shut down before this request finished", retry_after=5)
            left = list(self._pending) + list(self._active.values())
            for job in left:
                self._cancel[job.id] = (job, err)
            if left:
                log.warning("drain: %d request(s) unfinished after the grace of %g s: failing them with 503",
                            len(left), grace_s)
            else:
                log.info("drain: in-flight work finished")
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        else:  # never started, or died: nobody else will answer these
            self._fail_all(err)

    # ---- the worker thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.warm_up:
                self._warm_up()
            self.started.set()
            while self._loop_once():
                pass
        except BaseException as e:  # the worker must never die silently: fail everything, report, let it restart
            self._die(e)
        finally:
            self.started.set()

    def _loop_once(self) -> bool:
        """Cancel, admit, step. False when the scheduler has stopped."""
        with self._cond:
            cancels = self._take_cancellations()
            stop = self._stop
        for job, error in cancels:
            self._fail(job, error)  # answer first, then touch the device
            self.engine.cancel(job.id)
            self.metrics.cancelled.labels(error.reason).inc()
        if stop:
            return False
        with self._cond:
            admits = self._plan_admissions()
            if not admits and not len(self.engine):
                self.metrics.active.set(0)
                if not self._cancel and not self._stop:
                    self._cond.wait(timeout=0.5)
                idle = True
            else:
                idle = False
        if idle:
            self.heap.maybe_trim()  # outside the lock: submitters never wait for it
            return True
        self._device_work(lambda: self._add(admits), tuple(job for job, _, _ in admits), sum(k for _, _, k in admits))
        if len(self.engine):
            self._step()
        self.heap.maybe_trim()
        return True

    def _take_cancellations(self) -> list[tuple[Job, JobError]]:
        """Under the lock: deadlines, then every requested cancellation, out of the queue and the job table."""
        now = time.monotonic()
        for job in list(self._pending) + list(self._active.values()):
            if job.deadline is not None and now > job.deadline and job.id not in self._cancel:
                self._cancel[job.id] = (job, JobError("deadline", "request deadline passed before it finished"))
        out = []
        for job_id, (job, error) in self._cancel.items():
            if job in self._pending:
                self._pending.remove(job)
            self._active.pop(job_id, None)
            if not job.future.done():
                out.append((job, error))
        self._cancel.clear()
        self._queue_changed()
        return out

    def _queue_gauges(self) -> None:
        """Under the lock: the queue's depth in requests and in samples not yet admitted (what an autoscaler adds
        to active_samples: deploy/k8s)."""
        self.metrics.queue_depth.set(len(self._pending))
        self.metrics.queued_samples.set(sum(job.n - job.admitted for job in self._pending))

    def _queue_changed(self) -> None:
        """Under the lock: the queue gauges, and each waiting job's new place in the queue."""
        self._queue_gauges()
        for position, job in enumerate(self._pending):
            if job.admitted == 0 and job.position != position:
                job.position = position
                job.notify("queued", queue_position=position)

    def _plan_admissions(self) -> list[tuple[Job, int, int]]:
        """Under the lock: (job, first index, count) to add, FIFO, at most max_batch rows in the engine."""
        room = self.max_batch - len(self.engine)
        admits = []
        while self._pending and room > 0:
            job = self._pending[0]
            k = min(job.n - job.admitted, room)
            admits.append((job, job.admitted, k))
            if job.admitted == 0:
                job.started_at = time.monotonic()
                job.state, job.position = "running", None
                self.metrics.queue_wait.observe(job.started_at - job.enqueued_at)
                self._active[job.id] = job
                job.notify("running")
            job.admitted += k
            room -= k
            if job.admitted == job.n:
                self._pending.popleft()
        if admits:
            self._queue_changed()
        return admits

    def _add(self, admits: list[tuple[Job, int, int]]) -> None:
        for job, start, count in admits:
            self.engine.add(job.id, job.specs(start, count), first_index=start, edits=job.edits(start, count))

    def _device_work(self, work: Callable[[], object], jobs: tuple[Job, ...] = (), rows: int = 0
                     ) -> tuple[bool, object]:
        """(True, work()) or, after a failure, (False, None). OOM and ordinary errors fail the batch, handled after
        the except block so that the failed step's tensors, held by the traceback, are freed first; a device fault
        is re-raised (fatal). Only engine calls run here: an error in the scheduler's own code is fatal too.
        jobs, rows: requests to fail with the batch besides those with rows in it, and the rows they would add."""
        batch = len(self.engine) + rows
        try:
            return True, work()
        except torch.OutOfMemoryError:
            oom, message = True, ""
        except Exception as e:
            if is_device_fault(e):
                raise
            log.exception("denoising step failed")
            oom, message = False, f"generation failed: {type(e).__name__}: {e}"
        if oom:
            self._on_oom(batch, jobs)
        else:
            self._fail_batch(JobError("failed", message), jobs)
        return False, None

    def _step(self) -> None:
        m, batch = self.metrics, len(self.engine)
        m.active.set(batch)
        self._timer.start()
        ok, out = self._device_work(self.engine.step)
        if not ok:
            return
        self._timer.stop()
        k = out.steps  # more than 1 where the runner chained steps into one call (model/onnx_chain.py)
        for dt in self._timer.done():  # on CUDA: the steps the GPU has finished, read without waiting for it
            dt /= k
            self._step_s = dt if not self._step_s else 0.95 * self._step_s + 0.05 * dt
            for _ in range(k):
                m.step_duration.observe(dt)
        for _ in range(k):
            m.batch_size.observe(batch)
        m.steps.inc(k)
        m.sample_steps.inc(batch * k)
        with self._cond:
            for row in self.engine.rows:
                job = self._active.get(row.group)
                if job is not None:
                    job.steps_done[row.index] = row.pos
            for job_id, index, step, image in out.previews:
                job = self._active.get(job_id)
                if job is not None:
                    job.notify("preview", index=index, step=step, image=image)
            for job_id, index in out.failed:  # NaN/Inf: its request fails (its other rows leave before the next step)
                job = self._active.get(job_id)
                m.non_finite.inc()
                if job is not None and job.id not in self._cancel:
                    self._cancel[job.id] = (job, JobError(
                        "non_finite", f"image {index} (seed {job.seed + index}) came out as NaN/Inf: the network's "
                                      "output is not finite; no image is returned for this request"))
            for job_id, index, image in out.finished:
                job = self._active.get(job_id)
                if job is None:
                    continue
                job.images[index] = image
                job.steps_done[index] = job.steps
                m.images.inc()
                if len(job.images) == job.n:
                    job.finished_at = time.monotonic()
                    m.generation.observe(job.finished_at - job.started_at)
                    del self._active[job_id]
                    if not job.future.done():
                        job.state = "succeeded"
                        job.future.set_result(np.stack([job.images[i] for i in range(job.n)]))
                        job.notify("succeeded")
            for job in {self._active[r.group] for r in self.engine.rows if r.group in self._active}:
                job.step_s = self._step_s
                job.notify("progress")

    def _warm_up(self) -> None:
        """One step at every batch size the scheduler can run (1..max_batch), on this thread: kernel selection
        (cuDNN, the TorchScript profiler) and ONNX Runtime's sessions (spinning ones too) happen here, not in the
        first requests. An OOM lowers the limit."""
        runner = self.engine.runner
        chain = getattr(runner, "chain_steps", 0)
        if hasattr(runner, "build_spinning_sessions"):  # SPIN_THREADS=auto: the sessions it may switch to
            runner.build_spinning_sessions()
        for b in range(1, self.max_batch + 1):
            # where the runner chains steps for this batch size, enough steps to build that session too
            steps = chain if chain > 1 and runner.can_chain(b) else 1
            self.engine.add("warmup", [SampleSpec(0, "ddim", steps)] * b)
            try:
                while len(self.engine):
                    self.engine.step()
            except torch.OutOfMemoryError:
                oom = True
            else:
                oom = False
            if oom:
                self.engine.clear()
                self._on_oom(b)
                break

    def _fail(self, job: Job, error: JobError) -> None:
        if not job.future.done():
            job.state, job.error, job.position = ("cancelled" if error.reason in CANCELLED else "failed"), error, None
            job.future.set_exception(error)
            job.notify(job.state)

    def _fail_batch(self, error: JobError, also: tuple[Job, ...] = ()) -> None:
        """Fail every request with samples in the batch, and `also` (the rest of a request still queued goes too),
        then empty the engine without touching the device."""
        with self._cond:
            ids = self.engine.groups() | {job.id for job in also}
            jobs = [self._active.pop(g) for g in ids if g in self._active]
            for job in jobs:
                if job in self._pending:
                    self._pending.remove(job)
            self._queue_gauges()
        for job in jobs:
            self._fail(job, error)
        self.engine.clear()

    def _fail_all(self, error: JobError) -> None:
        with self._cond:
            jobs = list(self._pending) + list(self._active.values()) + [j for j, _ in self._cancel.values()]
            self._pending.clear()
            self._active.clear()
            self._cancel.clear()
            self._queue_gauges()
        for job in jobs:
            self._fail(job, error)

    def _on_oom(self, batch: int, also: tuple[Job, ...] = ()) -> None:
        self.metrics.oom.inc()
        new_limit = max(1, min(self.max_batch, batch) // 2)
        log.error("out of memory at batch %d: failing its requests, batch limit %d -> %d",
                  batch, self.max_batch, new_limit)
        self._fail_batch(JobError("oom", f"out of GPU memory at batch size {batch}; the batch limit is now "
                                         f"{new_limit}, retry", retry_after=1), also)
        self.max_batch = new_limit
        self.metrics.batch_limit.set(new_limit)
        self.engine.release_cached_memory()

    def _die(self, exc: BaseException) -> None:
        log.critical("denoising worker failed: %s: %s; failing every request", type(exc).__name__, exc,
                     exc_info=exc)
        with self._cond:
            self.fatal = exc
            self._stop = True
        self.metrics.active.set(0)
        self._fail_all(JobError("worker_failed", f"the denoising worker failed ({type(exc).__name__}); the "
                                "service is restarting, retry", retry_after=10))
        try:
            self.engine.clear()
        except Exception:  # nothing more to save
            pass
        if self.on_fatal is not None:
            self.on_fatal(exc)
