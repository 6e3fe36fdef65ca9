"""Job handles: states, cancel, event streams with previews, idempotency, keys, expiry, the store's bound, and
OpenAI's Images API through the real `openai` client."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from service.settings import Settings

from service_helpers import decode_png, metric, running, slow_steps

TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def served(tiny_weights):
    # 5 ms more per step: a 1000-step job stays running through the requests that cancel or watch it
    with running(Settings(weights=tiny_weights, max_batch=4, max_n=4, warmup=False), app_hook=slow_steps(0.005))\
            as (url, app):
        yield url, app


def start(url, body, **kw):
    r = httpx.post(url + "/v1/jobs", json=body, timeout=30, **kw)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()


def get(url, job_id, **kw):
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30, **kw)


def wait_state(url, job_id, states, timeout=60, **kw):
    end = time.monotonic() + timeout
    while True:
        info = get(url, job_id, **kw).json()
        if info["state"] in states:
            return info
        assert time.monotonic() < end, info
        time.sleep(0.02)


def events(url, job_id, timeout=120, **kw):
    """(event, data) of a job's stream, up to and including its end."""
    out = []
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=timeout, **kw) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
                if kind in TERMINAL:
                    break
    return out


def pixels(b64png):
    return decode_png(b64png)[0]


def test_a_job_runs_to_success_with_previews_in_order_and_its_images_equal_generates(served):
    url, _ = served
    body = {"n": 2, "seed": 21, "sampler": "ddpm", "steps": 40, "preview_every": 10}
    job = start(url, body)
    assert job["state"] in ("queued", "running") and job["n"] == 2 and job["total_steps"] == 80
    stream = events(url, job["id"])
    kinds = [k for k, _ in stream]
    assert kinds[0] in ("queued", "running") and kinds[-1] == "completed" and kinds.count("completed") == 1
    assert "running" in kinds and kinds.index("running") < kinds.index("preview")
    previews = [d for k, d in stream if k == "preview"]
    assert sorted((d["index"], d["step"]) for d in previews) == [(i, s) for i in (0, 1) for s in (10, 20, 30, 40)]
    for i in (0, 1):  # steps increase per image
        steps = [d["step"] for d in previews if d["index"] == i]
        assert steps == sorted(steps)
    done = stream[-1][1]
    final = [pixels(im["png"]) for im in done["images"]]
    last = {d["index"]: pixels(d["png"]) for d in previews if d["step"] == 40}
    for i in (0, 1):
        assert np.array_equal(last[i], final[i])  # x0 estimate at the last step is the image
    early = [pixels(d["png"]) for d in previews if d["index"] == 0 and d["step"] == 10][0]
    assert not np.array_equal(early, final[0])  # a preview shows the image forming, not the end
    info = get(url, job["id"]).json()
    assert info["state"] == "succeeded" and info["step"] == 80 and info["eta_s"] is None
    assert [p["step"] for p in info["images_progress"]] == [40, 40] and info["timings"]["generate_s"] > 0
    plain = httpx.post(url + "/generate", json={k: v for k, v in body.items() if k != "preview_every"},
                       timeout=60).json()
    assert [im["png"] for im in info["images"]] == [im["png"] for im in plain["images"]]
    png = httpx.get(f"{url}/v1/jobs/{job['id']}/images/1")
    assert png.headers["content-type"] == "image/png" and png.headers["x-seed"] == "22"
    assert base64.b64encode(png.content).decode() == plain["images"][1]["png"]
    assert httpx.get(f"{url}/v1/jobs/{job['id']}/images/2").status_code == 404


def test_a_late_subscriber_gets_the_current_state_first(served):
    url, _ = served
    job = start(url, {"n": 1, "seed": 3, "sampler": "ddim", "steps": 20, "preview_every": 5})
    wait_state(url, job["id"], ("succeeded",))
    stream = events(url, job["id"])
    kinds = [k for k, _ in stream]
    assert kinds[0] == "running" and kinds[-1] == "completed" and kinds.count("completed") == 1
    assert [d["step"] for k, d in stream if k == "preview"] == [20]  # the latest preview of each image
    assert stream[1] == ("progress", {"step": 20, "steps": 20, "eta_s": None}) or stream[1][0] == "progress"


def test_cancel_while_running_frees_the_slot_within_a_step(tiny_weights):
    # 100 ms per step, so that HTTP round trips are short against a step
    with running(Settings(weights=tiny_weights, max_batch=4, warmup=False), app_hook=slow_steps(0.1)) as (url, _):
        long = start(url, {"n": 4, "seed": 1, "steps": 1000})  # fills the batch (max 4)
        queued = start(url, {"n": 1, "seed": 9, "sampler": "ddim", "steps": 5})
        wait_state(url, long["id"], ("running",))
        assert get(url, queued["id"]).json()["queue_position"] == 0
        before = get(url, long["id"]).json()["step"]
        r = httpx.delete(f"{url}/v1/jobs/{long['id']}", timeout=30)
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        assert r.json()["error"]["reason"] == "cancelled"
        after = r.json()["step"]
        # its 4 samples took at most: the step in flight at the GET, one while the DELETE travelled, the one in
        # flight when it arrived (tests/test_scheduler.py checks the exact rule: gone before the next step)
        assert after - before <= 3 * 4
        assert wait_state(url, queued["id"], ("succeeded",))["state"] == "succeeded"  # the freed slot was used
        assert get(url, long["id"]).json()["step"] == after  # and it never stepped again
        again = httpx.delete(f"{url}/v1/jobs/{long['id']}")  # cancelling a finished job: a no-op, its state
        assert again.status_code == 200 and again.json()["state"] == "cancelled"
        assert httpx.delete(f"{url}/v1/jobs/{queued['id']}").json()["state"] == "succeeded"
        assert httpx.get(f"{url}/v1/jobs/{long['id']}/images/0").status_code == 409


def test_cancel_while_queued_and_a_stream_that_sees_it(tiny_weights):
    # slowed steps: on a fast CPU the tiny model's 1000 steps end within the 0.3 s below, and the waiting job runs
    with running(Settings(weights=tiny_weights, max_batch=1, warmup=False), app_hook=slow_steps(0.1)) as (url, _):
        running_job = start(url, {"n": 1, "seed": 1, "steps": 1000})
        waiting = start(url, {"n": 1, "seed": 2, "steps": 1000})
        wait_state(url, running_job["id"], ("running",))
        with ThreadPoolExecutor(1) as ex:
            stream = ex.submit(events, url, waiting["id"])
            time.sleep(0.3)
            r = httpx.delete(f"{url}/v1/jobs/{waiting['id']}")
            assert r.json()["state"] == "cancelled" and r.json()["step"] == 0
            kinds = [k for k, _ in stream.result(timeout=30)]
        assert kinds[0] == "queued" and kinds[-1] == "cancelled" and "running" not in kinds
        assert metric(url, "celeba_ddpm_cancelled_requests_total", {"reason": "cancelled"}) == 1
        httpx.delete(f"{url}/v1/jobs/{running_job['id']}")


def test_a_deadline_fails_the_job_and_a_disconnected_stream_does_not_cancel_it(tiny_weights):
    # slowed steps: on a fast CPU the tiny model's 1000 steps end within the 0.5 s deadline
    with running(Settings(weights=tiny_weights, warmup=False), app_hook=slow_steps(0.1)) as (url, _):
        job = start(url, {"n": 1, "seed": 5, "steps": 1000, "deadline_s": 0.5})
        with httpx.stream("GET", f"{url}/v1/jobs/{job['id']}/events", timeout=30) as r:
            next(r.iter_lines())  # connected; now leave (the discarded iterator closes the response)
        time.sleep(0.1)
        assert get(url, job["id"]).json()["state"] in ("queued", "running")  # leaving the stream cancelled nothing
        info = wait_state(url, job["id"], ("failed",))
        assert info["error"] == {"reason": "deadline", "detail": "request deadline passed before it finished"}
        assert [k for k, _ in events(url, job["id"])][-1] == "failed"


def test_idempotency_key_returns_the_same_job(served):
    url, _ = served
    body = {"n": 1, "seed": 8, "sampler": "ddim", "steps": 3}
    a = start(url, body, headers={"Idempotency-Key": "order-17"})
    b = start(url, body, headers={"Idempotency-Key": "order-17"})
    c = start(url, body, headers={"Idempotency-Key": "order-18"})
    assert a["id"] == b["id"] != c["id"]


def test_bad_job_requests(served):
    url, _ = served
    r = httpx.post(url + "/v1/jobs", json={"steps": 1000, "preview_every": 5})
    assert r.status_code == 422 and "at most 100 previews" in r.json()["detail"]
    assert httpx.post(url + "/v1/jobs", json={"preview_every": -1}).status_code == 422
    r = get(url, "no-such-job")
    assert r.status_code == 404 and "no job" in r.json()["detail"]


def test_keys_scope_jobs_and_the_openapi_document_declares_auth_only_with_keys(tiny_weights, tmp_path, served):
    url, _ = served
    spec = httpx.get(url + "/openapi.json").json()
    assert "securitySchemes" not in spec.get("components", {})  # no keys: nothing to declare
    (tmp_path / "keys").write_text("# team keys\nbeta-key\n")
    settings = Settings(weights=tiny_weights, warmup=False, api_keys="alpha-key", api_keys_file=tmp_path / "keys")
    with running(settings, app_hook=slow_steps(0.005)) as (kurl, _):  # the job still runs when it is cancelled
        spec = httpx.get(kurl + "/openapi.json").json()
        assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        alpha, beta = ({"Authorization": f"Bearer {k}"} for k in ("alpha-key", "beta-key"))
        job = start(kurl, {"n": 1, "seed": 1, "steps": 1000}, headers=alpha)
        assert get(kurl, job["id"], headers=alpha).status_code == 200
        assert get(kurl, job["id"], headers=beta).status_code == 404  # another key's job does not exist for it
        assert httpx.delete(f"{kurl}/v1/jobs/{job['id']}", headers=beta).status_code == 404
        assert get(kurl, job["id"]).status_code == 401
        assert httpx.post(kurl + "/v1/jobs", json={}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.delete(f"{kurl}/v1/jobs/{job['id']}", headers=alpha).json()["state"] == "cancelled"


def test_finished_jobs_expire_and_a_full_store_refuses_with_retry_after(tiny_weights):
    with running(Settings(weights=tiny_weights, warmup=False, max_jobs=2, job_ttl_s=0.5)) as (url, _):
        a = start(url, {"n": 1, "seed": 1, "sampler": "ddim", "steps": 2})
        b = start(url, {"n": 1, "seed": 2, "sampler": "ddim", "steps": 2})
        wait_state(url, a["id"], ("succeeded",))
        r = httpx.post(url + "/v1/jobs", json={"n": 1})
        assert r.status_code == 503 and "too many jobs" in r.json()["detail"] and int(r.headers["retry-after"]) >= 1
        assert httpx.post(url + "/generate", json={"n": 1, "steps": 2, "sampler": "ddim"}).status_code == 503
        assert metric(url, "celeba_ddpm_rejected_requests_total", {"reason": "store_full"}) == 2
        assert metric(url, "celeba_ddpm_jobs", {"state": "succeeded"}) == 2
        time.sleep(0.7)
        r = get(url, b["id"])
        assert r.status_code == 404 and "expired" in r.json()["detail"]
        start(url, {"n": 1, "seed": 3, "sampler": "ddim", "steps": 2})  # room again


def test_event_stream_and_preview_metrics(served):
    url, _ = served
    sent = metric(url, "celeba_ddpm_previews_sent_total")
    long = start(url, {"n": 1, "seed": 4, "steps": 1000})
    with httpx.stream("GET", f"{url}/v1/jobs/{long['id']}/events", timeout=30) as r:
        lines = r.iter_lines()  # one iterator: a discarded one closes the response
        assert next(lines) == "event: running"
        assert metric(url, "celeba_ddpm_open_event_streams") == 1
        httpx.delete(f"{url}/v1/jobs/{long['id']}")
        assert any(line.startswith("event: cancelled") for line in lines)
    time.sleep(0.1)
    assert metric(url, "celeba_ddpm_open_event_streams") == 0
    job = start(url, {"n": 1, "seed": 4, "sampler": "ddim", "steps": 50, "preview_every": 10})
    assert sum(k == "preview" for k, _ in events(url, job["id"])) >= 1
    assert metric(url, "celeba_ddpm_previews_sent_total") > sent
    assert metric(url, "celeba_ddpm_jobs", {"state": "cancelled"}) >= 1


def test_openai_client_against_the_service(served):
    import openai

    url, _ = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    result = client.images.generate(model="default", prompt="a smiling face", n=2, size="8x8",
                                    extra_body={"seed": 7, "steps": 6, "sampler": "ddim"})
    plain = httpx.post(url + "/generate", json={"n": 2, "seed": 7, "steps": 6, "sampler": "ddim"}).json()
    assert [d.b64_json for d in result.data] == [im["png"] for im in plain["images"]]
    stream = client.images.generate(model="tiny-test", prompt="a face", size="8x8", stream=True, partial_images=2,
                                    extra_body={"seed": 7, "steps": 6, "sampler": "ddim"})
    seen = list(stream)
    assert [e.type for e in seen] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in seen[:2]] == [0, 1]
    assert seen[-1].b64_json == plain["images"][0]["png"]
    with pytest.raises(openai.UnprocessableEntityError, match="size: must be '8x8'"):
        client.images.generate(prompt="x", size="1024x1024")
    with pytest.raises(openai.UnprocessableEntityError, match="serves 'tiny-test'"):
        client.images.generate(prompt="x", model="gpt-image-1")
    with pytest.raises(openai.UnprocessableEntityError, match="response_format"):
        client.images.generate(prompt="x", response_format="url")


def test_ten_thousand_jobs_keep_the_store_and_memory_bounded(tiny_weights):
    """10,000 jobs submitted and finished through the real scheduler (1-step ddim on the tiny U-Net): the store
    never holds more than MAX_JOBS, remembers a bounded number of expired ids, and no finished job stays alive
    (every record and job object is freed, so memory does not grow with the number of jobs served)."""
    import asyncio
    import gc
    import weakref

    from service.deps import submit
    from service.runtime import build_runtime
    from service.scheduler import Job, JobError

    alive = weakref.WeakSet()

    async def churn():
        rt = build_runtime(Settings(weights=tiny_weights, max_jobs=64, job_ttl_s=0.01, max_batch=16, queue_size=64,
                                    warmup=False))
        rt.store._remember = 500
        rt.scheduler.start()
        sizes, records = [], []
        for i in range(10_000):
            while True:
                try:
                    record = submit(rt, Job(i, 1, "ddim", 1), None, kind="job")
                    break
                except JobError as e:
                    assert e.reason in ("store_full", "queue_full")
                    await asyncio.sleep(0.002)
            alive.add(record)
            alive.add(record.job)
            sizes.append(len(rt.store))
            records = (records + [record])[-64:]  # a client holds only its recent handles
        await asyncio.gather(*(r.done.wait() for r in records))
        await asyncio.sleep(0.05)
        rt.store.sweep()
        rt.scheduler.stop()
        return sizes, rt

    sizes, rt = asyncio.run(churn())
    gc.collect()
    assert max(sizes) <= 64 and len(rt.store._expired) <= 500 and len(rt.store) <= 64
    assert len(alive) <= 2 * 64, f"{len(alive)} job objects of 10,000 still alive"


def test_a_replica_name_prefixes_job_ids(tiny_weights):
    """REPLICA=api-0: ids are 'api-0.<token>' (what deploy/nginx routes on; tests/test_load_balancer.py), and the
    whole id still finds the job. A name a proxy could not route on is a bad setting."""
    for bad in ("API_0", "-a", "a.b", "x" * 64):
        with pytest.raises(ValueError):
            Settings(replica=bad)
    with running(Settings(weights=tiny_weights, replica="api-0", warmup=False)) as (url, _):
        info = start(url, {"n": 1, "steps": 2, "sampler": "ddim"})
        prefix, token = info["id"].split(".")
        assert prefix == "api-0" and len(token) >= 20
        assert wait_state(url, info["id"], ("succeeded", "failed", "cancelled"))["state"] == "succeeded"
