"""The batching scheduler under faults, with the real engine on a tiny U-Net and errors injected around it."""

import concurrent.futures
import threading
import time
import weakref

import pytest
import torch

from model.diffusion import Diffusion
from model.engine import SamplerEngine
from model.unet import PRESETS, UNet
from service.metrics import Metrics
from service.scheduler import JobError, Job, Scheduler


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(PRESETS["tiny"])


def make(unet, max_batch=4, queue_size=16, warm_up=False, fatal=None):
    engine = SamplerEngine(unet, Diffusion(), runner="eager")
    deaths = []

    def on_fatal(exc):
        deaths.append(exc)
        if fatal:
            fatal(exc)

    s = Scheduler(engine, Metrics(), max_batch, queue_size, warm_up=warm_up, on_fatal=on_fatal)
    return s, engine, deaths


def job(n=1, steps=1000, sampler="ddpm", seed=0, deadline=None):
    return Job(seed, n, sampler, steps, deadline=deadline)


def error_of(j: Job, timeout=30) -> JobError:
    with pytest.raises(JobError) as info:
        j.future.result(timeout=timeout)
    return info.value


def wait_for(cond, timeout=20):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


def test_batch_never_exceeds_the_limit_and_large_requests_go_in_parts_fifo(unet):
    s, engine, _ = make(unet, max_batch=3)
    sizes, adds = [], []
    real_step, real_add = engine.step, engine.add
    engine.step = lambda: (sizes.append(len(engine)), real_step())[1]
    engine.add = lambda group, specs, first_index=0, edits=None: (
        adds.append((group, first_index, len(list(specs)))), real_add(group, specs, first_index, edits))[1]
    a, b, c = job(n=5, steps=4, sampler="ddim"), job(n=2, steps=3, sampler="ddim"), job(n=1, steps=2, sampler="ddim")
    for j in (a, b, c):
        s.submit(j)
    s.start()
    for j in (a, b, c):
        assert j.future.result(timeout=30).shape[0] == j.n
    s.stop()
    assert max(sizes) == 3 and all(0 < n <= 3 for n in sizes)
    # a's 5 rows go in as 3 then 2 as room appears; b only after all of a, c only after all of b
    assert [x for x in adds if x[0] == a.id] == [(a.id, 0, 3), (a.id, 3, 2)]
    order = [g for g, _, _ in adds]
    assert order.index(b.id) > max(i for i, g in enumerate(order) if g == a.id)
    assert order.index(c.id) > max(i for i, g in enumerate(order) if g == b.id)


def test_a_cancelled_job_leaves_the_batch_before_the_next_step(unet):
    s, engine, _ = make(unet, max_batch=4)
    a, b = job(n=3, steps=50, sampler="ddim"), job(n=1, steps=50, sampler="ddim")
    sizes = []
    real_step = engine.step

    def step():
        sizes.append(len(engine))
        if len(sizes) == 5:
            s.cancel(a, JobError("cancelled", "by the client"))  # arrives during step 5
        return real_step()

    engine.step = step
    s.submit(a)
    s.submit(b)
    s.start()
    assert error_of(a).reason == "cancelled" and a.state == "cancelled"
    b.future.result(timeout=30)
    assert sizes[:6] == [4, 4, 4, 4, 4, 1]  # step 6 ran without a's rows
    assert a.steps_done == [5, 5, 5]
    s.stop()


def test_warm_up_runs_every_batch_size_on_the_worker_thread(unet):
    s, engine, _ = make(unet, max_batch=5, warm_up=True)
    seen = []
    real_step = engine.step
    engine.step = lambda: (seen.append((threading.current_thread().name, len(engine))), real_step())[1]
    s.start()
    assert s.started.wait(30)
    assert sorted(b for _, b in seen) == [1, 2, 3, 4, 5] and {name for name, _ in seen} == {"denoiser"}
    assert len(engine) == 0
    s.stop()


def test_an_oom_in_warm_up_lowers_the_batch_limit_instead_of_failing_start_up(unet):
    """A model too large for MAX_BATCH on this GPU (a 256x256 checkpoint on a small card): warm-up finds the
    batch size that runs out of memory, halves it, and the service starts with that limit."""
    s, engine, deaths = make(unet, max_batch=8, warm_up=True)
    real_step = engine.step

    def step():
        if len(engine) >= 5 and not s.started.is_set():
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step()

    engine.step = step
    s.start()
    assert s.started.wait(30) and s.alive() and not deaths
    assert s.max_batch == 2 and s.metrics.batch_limit._value.get() == 2 and len(engine) == 0
    j = job(n=4, steps=3, sampler="ddim")
    s.submit(j)
    assert j.future.result(timeout=30).shape[0] == 4  # served in parts of 2
    s.stop()


def test_a_deadline_that_passes_in_the_queue_fails_the_request_there(unet):
    s, _, _ = make(unet, max_batch=1)
    s.start()
    long = job(steps=1000)
    s.submit(long)
    wait_for(lambda: long.started_at is not None)
    queued = job(steps=2, sampler="ddim", deadline=time.monotonic() + 0.2)
    s.submit(queued)
    err = error_of(queued)
    assert err.reason == "deadline" and queued.started_at is None and queued.state == "failed"  # never admitted
    assert s.metrics.cancelled.labels("deadline")._value.get() == 1
    s.stop()
    assert error_of(long).reason == "shutdown"


def test_an_ordinary_error_fails_the_batch_and_keeps_serving(unet):
    s, engine, deaths = make(unet)
    real_step = engine.step
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("a bug")
        return real_step()

    engine.step = flaky
    s.start()
    first = job(n=2, steps=5, sampler="ddim")
    s.submit(first)
    err = error_of(first)
    assert err.reason == "failed" and "ValueError: a bug" in err.message
    again = job(n=2, steps=5, sampler="ddim")
    s.submit(again)
    assert again.future.result(timeout=30).shape[0] == 2 and s.alive() and not deaths
    s.stop()


def test_oom_handler_runs_after_the_failed_steps_tensors_are_freed(unet):
    s, engine, deaths = make(unet, max_batch=4)
    held = {}

    def oom_forward(x, t):
        activations = torch.empty(1000, 1000)  # what a failed forward's frames would still hold
        held["ref"] = weakref.ref(activations)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    engine.runner = oom_forward
    freed = []
    real_on_oom = s._on_oom
    s._on_oom = lambda batch, also=(): (freed.append(held["ref"]() is None), real_on_oom(batch, also))[1]
    s.start()
    j = job(n=4, steps=5, sampler="ddim")
    s.submit(j)
    err = error_of(j)
    assert err.reason == "oom" and err.retry_after == 1 and "batch limit is now 2" in err.message
    assert freed == [True] and s.max_batch == 2 and s.alive() and not deaths
    s.stop()


def test_a_failure_while_adding_rows_answers_the_requests_being_added(unet):
    s, engine, deaths = make(unet, max_batch=4)
    real_add = engine.add
    calls = {"n": 0}

    def add(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, while adding x_T)")
        return real_add(*args, **kwargs)

    engine.add = add
    first = job(n=4, steps=4, sampler="ddim")
    s.submit(first)
    s.start()
    assert error_of(first, timeout=10).reason == "oom"  # not left waiting: its rows never reached the engine
    second = job(n=3, steps=4, sampler="ddim")
    s.submit(second)
    assert second.future.result(timeout=30).shape[0] == 3 and s.max_batch == 2 and not deaths
    s.stop()


@pytest.mark.parametrize("where", ["step", "scheduler"])
def test_a_fatal_error_fails_every_request_and_reports_the_worker_dead(unet, where):
    """A sticky CUDA error (every later device call fails too) or a bug in the scheduler itself: every request,
    running or queued, is answered at once; the worker says it is dead; on_fatal fires (the process exits)."""
    s, engine, deaths = make(unet, max_batch=2)
    broken = threading.Event()

    def device_call(real):
        def call(*args, **kwargs):
            if broken.is_set():
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            return real(*args, **kwargs)
        return call

    if where == "step":
        engine.step, engine.add, engine.cancel = (device_call(engine.step), device_call(engine.add),
                                                   device_call(engine.cancel))
    else:
        real_observe = s.metrics.batch_size.observe
        s.metrics.batch_size.observe = lambda v: (_ for _ in ()).throw(KeyError("bug")) if broken.is_set() \
            else real_observe(v)
    s.start()
    running, queued = job(n=2), job(n=1)
    s.submit(running)
    s.submit(queued)
    wait_for(lambda: running.started_at is not None)
    broken.set()
    for j in (running, queued):
        err = error_of(j, timeout=10)
        assert err.reason == "worker_failed" and err.retry_after and "worker failed" in err.message
    wait_for(lambda: not s._thread.is_alive())
    assert not s.alive() and not s.healthy() and len(deaths) == 1
    with pytest.raises(JobError, match="worker failed") as late:
        s.submit(job())
    assert late.value.reason == "worker_failed"
    s.stop()  # returns: nothing to wait for


def test_submit_and_cancel_never_wait_for_the_device(unet):
    """While the worker is inside a slow device call (a GPU sync, here a blocked step), the event loop's
    submit() and cancel() return at once: the lock is never held across device work."""
    s, engine, _ = make(unet, max_batch=4)
    inside, release = threading.Event(), threading.Event()
    real_step, real_add = engine.step, engine.add

    def slow(real):
        def call(*args, **kwargs):
            inside.set()
            release.wait(30)
            return real(*args, **kwargs)
        return call

    engine.step, engine.add = slow(real_step), slow(real_add)
    s.start()
    first = job(n=1, steps=3, sampler="ddim")
    s.submit(first)
    assert inside.wait(10)
    t0 = time.monotonic()
    other = job(n=1, steps=3, sampler="ddim")
    s.submit(other)
    s.cancel(first, JobError("disconnect", "client disconnected"))
    assert time.monotonic() - t0 < 0.5
    release.set()
    assert error_of(first).reason == "disconnect" and first.state == "cancelled"
    assert other.future.result(timeout=30).shape[0] == 1
    s.stop()


def test_drain_is_idempotent_and_fails_what_outlives_the_grace(unet):
    s, _, _ = make(unet, max_batch=2)
    s.start()
    short, long = job(n=1, steps=3, sampler="ddim"), job(n=1, steps=1000)
    s.submit(long)
    s.submit(short)
    t1 = s.drain(0.5)
    assert s.drain(30) is t1  # a second call (SIGTERM, then the app's shutdown) joins the first
    with pytest.raises(JobError, match="shutting down"):
        s.submit(job())
    assert short.future.result(timeout=10).shape[0] == 1  # in-flight work finishes within the grace
    err = error_of(long, timeout=10)  # work past the grace is failed with 503 and Retry-After
    assert err.reason == "shutdown" and err.retry_after and "shut down" in err.message
    t1.join(10)
    assert not t1.is_alive() and s.healthy()  # stopped on purpose: not a failure
    assert isinstance(long.future, concurrent.futures.Future)


def test_queued_samples_counts_what_is_not_yet_in_the_batch(unet):
    """queued_samples + active_samples is what the autoscaler reads (deploy/k8s): a request admitted in parts
    counts its rows still outside the batch, and the two add up to every accepted sample."""
    s, engine, _ = make(unet, max_batch=3)
    gauge = lambda name: getattr(s.metrics, name)._value.get()  # noqa: E731
    a, b = job(n=5, steps=1000), job(n=2, steps=1000)
    s.submit(a)
    s.submit(b)
    assert gauge("queued_samples") == 7 and gauge("queue_depth") == 2
    s.start()
    wait_for(lambda: gauge("active") == 3)
    assert gauge("queued_samples") == 4 and gauge("queue_depth") == 2  # a: 2 rows wait, b: 2
    s.cancel(a, JobError("disconnect", "gone"))
    wait_for(lambda: gauge("queued_samples") == 0 and gauge("active") == 2)  # b moves in
    s.cancel(b, JobError("disconnect", "gone"))
    wait_for(lambda: gauge("active") == 0)
    s.stop()


def test_the_worker_gives_freed_heap_back_between_steps_and_when_idle(unet):
    from service.memory import HeapTrimmer

    assert not HeapTrimmer(0).enabled  # MALLOC_TRIM_S=0: never
    s, engine, _ = make(unet)
    s.heap = HeapTrimmer(0.05)
    if not s.heap.enabled:
        pytest.skip("not glibc: malloc_trim does not exist here")
    s.start()
    try:
        j = job(n=2, steps=200, sampler="ddim")
        s.submit(j)
        j.future.result(timeout=60)
        busy = s.heap.trims
        assert busy >= 1  # trimmed between steps while working
        time.sleep(1.2)  # idle: the worker wakes every 0.5 s and trims then too
        assert s.heap.trims > busy
    finally:
        s.stop()
