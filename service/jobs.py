"""Job handles: each request's state, progress, previews and images, kept in a bounded store, and its event stream.

The scheduler (service/scheduler.py) runs a `Job` and reports on it from the denoising thread; a `JobRecord` wraps
it for the API: who made it, when it expires, and the subscribers of its event stream. Everything here runs on the
event loop (the scheduler's reports arrive through `loop.call_soon_threadsafe`), so the store needs no lock.

Events, in order: `queued` (position), `running`, `progress` (at most every PROGRESS_EVERY_S, and at every preview),
`preview` (one image's x0 estimate at a step), then exactly one of `completed`, `failed`, `cancelled`. A subscriber
that arrives late gets the current state first (the latest preview of each image included), then what follows.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .scheduler import TERMINAL, Job, JobError

PROGRESS_EVERY_S = 0.5  # the most often a stream reports progress (enough for a progress bar and an ETA)
SUBSCRIBER_QUEUE = 256  # events buffered per stream; a stream that falls this far behind skips progress events


@dataclass
class Event:
    kind: str  # queued | running | progress | preview | completed | failed | cancelled
    data: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # preview pixels (HxWxC uint8), PNG-encoded by the stream off the event loop
    text: str | None = None  # the SSE message, made once by the first stream that sends it, shared by the rest


class JobRecord:
    """A job as the API sees it. Created and read on the event loop."""

    def __init__(self, job: Job, owner: str | None, kind: str = "job", idempotency_key: str | None = None,
                 on_end: Callable[["JobRecord"], None] | None = None, replica: str | None = None):
        """kind: 'job' (a /v1/jobs handle) or 'request' (/generate, /v1/images/generations: no handle).
        on_end: called on the event loop when the job ends. replica: this replica's name, the id's prefix (a load
        balancer routes on it). Create on the event loop."""
        token = secrets.token_urlsafe(16)  # unguessable: knowing an id is not enough without the owner's key
        self.id = f"{replica}.{token}" if replica else token
        self.job, self.owner, self.kind, self.on_end = job, owner, kind, on_end
        self.loop = asyncio.get_running_loop()
        self.idempotency_key = idempotency_key
        self.created = time.time()
        self.expires_at: float | None = None  # monotonic; set when the job ends
        self.previews: dict[int, tuple[int, np.ndarray]] = {}  # image index -> (step, pixels), the latest
        self.subscribers: set[asyncio.Queue] = set()
        self.pngs: list[bytes] | None = None  # the final images, PNG-encoded once
        self._last_progress = 0.0
        self._state = "queued"  # as far as the event loop has heard: what streams and GET report
        self.done = asyncio.Event()
        job.listener = self._from_worker

    # ---- reports from the denoising thread -------------------------------------------------------------------
    def _from_worker(self, kind: str, **data) -> None:
        try:
            self.loop.call_soon_threadsafe(self._publish, kind, data)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
            pass

    def _publish(self, kind: str, data: dict) -> None:
        image = data.pop("image", None)
        if kind == "preview":
            self.previews[data["index"]] = (data["step"], image)
        if kind == "progress":
            now = time.monotonic()
            if now - self._last_progress < PROGRESS_EVERY_S:
                return
            self._last_progress = now
        if kind == "running":
            self._state = "running"
        if kind in TERMINAL:
            self._state = kind
            kind = "completed" if kind == "succeeded" else kind
            self.done.set()
            if self.on_end is not None:
                self.on_end(self)
        self._send(self.event(kind, data, image))

    def _send(self, event: Event) -> None:
        for q in self.subscribers:
            if q.full():
                if event.kind in ("progress", "preview"):
                    continue  # a slow reader misses intermediate steps, never the end
                q.get_nowait()
            q.put_nowait(event)

    # ---- what the API reads ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state

    def event(self, kind: str, data: dict | None = None, image: np.ndarray | None = None) -> Event:
        data = dict(data or {})
        if kind in ("progress", "running"):
            data.setdefault("step", self.job.steps_done_total())
            data.setdefault("steps", self.job.steps * self.job.n)
            data.setdefault("eta_s", self.eta_s())
        if kind == "queued":
            data.setdefault("queue_position", self.job.position)
        if kind in ("failed", "cancelled") and self.job.error is not None:
            data.setdefault("reason", self.job.error.reason)
            data.setdefault("detail", self.job.error.message)
        return Event(kind, data, image)

    def eta_s(self) -> float | None:
        """Seconds to the last image at the measured step time (None before a step has been timed)."""
        step_s = self.job.step_s
        if not step_s:
            return None
        return round(step_s * (self.job.steps - min(self.job.steps_done)), 3)

    def snapshot(self) -> list[Event]:
        """What a late subscriber is told first: the state now, the latest previews, and the end if there is one."""
        state = self.state
        if state == "queued":
            return [self.event("queued")]
        events = [self.event("running"), self.event("progress")]
        events += [Event("preview", {"index": i, "step": s}, img) for i, (s, img) in sorted(self.previews.items())]
        if state in TERMINAL:
            events.append(self.event("completed" if state == "succeeded" else state))
        return events

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        for event in self.snapshot():
            q.put_nowait(event)
        self.subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self.subscribers.discard(q)


class NotFound(Exception):
    pass


class JobStore:
    """At most `max_jobs` jobs (queued, running and finished); a finished job is kept `ttl_s`, then answers
    'expired'. A full store refuses new jobs (503 + Retry-After) instead of dropping results it promised."""

    def __init__(self, max_jobs: int, ttl_s: float, remember_expired: int = 10_000):
        self.max_jobs, self.ttl_s = max_jobs, ttl_s
        self._jobs: dict[str, JobRecord] = {}
        self._expiry: deque[tuple[float, str]] = deque()  # (expires_at, id) in finishing order
        self._expired: OrderedDict[str, None] = OrderedDict()  # recent expired ids, for a clear 404
        self._remember = remember_expired
        self._idempotency: dict[tuple[str | None, str], str] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def count(self, state: str) -> int:
        return sum(1 for r in self._jobs.values() if r.state == state)

    def sweep(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] <= now:
            _, job_id = self._expiry.popleft()
            record = self._jobs.pop(job_id, None)
            if record is None:
                continue
            if record.idempotency_key is not None:
                self._idempotency.pop((record.owner, record.idempotency_key), None)
            if record.kind == "job":
                self._expired[job_id] = None
                if len(self._expired) > self._remember:
                    self._expired.popitem(last=False)

    def add(self, record: JobRecord) -> None:
        self.sweep()
        if len(self._jobs) >= self.max_jobs:
            wait = self._expiry[0][0] - time.monotonic() if self._expiry else 5.0
            raise JobError("store_full", f"too many jobs ({self.max_jobs}: queued, running or finished and not yet "
                                         f"expired); retry later", retry_after=max(1, int(wait) + 1))
        self._jobs[record.id] = record
        if record.idempotency_key is not None:
            self._idempotency[(record.owner, record.idempotency_key)] = record.id

    def finished(self, record: JobRecord, keep: bool = True) -> None:
        """The job ended: keep its result for ttl_s (or drop it now: /generate has answered already)."""
        if not keep:
            self._jobs.pop(record.id, None)
            return
        record.expires_at = time.monotonic() + self.ttl_s
        self._expiry.append((record.expires_at, record.id))
        self.sweep()

    def get(self, job_id: str, owner: str | None) -> JobRecord:
        self.sweep()
        record = self._jobs.get(job_id)
        if record is None or record.kind != "job" or record.owner != owner:  # another key's job does not exist
            if job_id in self._expired and record is None:
                raise NotFound(f"job {job_id} expired (results are kept {self.ttl_s:g} s after a job ends)")
            raise NotFound(f"no job {job_id}")
        return record

    def by_idempotency_key(self, owner: str | None, key: str) -> JobRecord | None:
        self.sweep()
        job_id = self._idempotency.get((owner, key))
        return self._jobs.get(job_id) if job_id is not None else None
