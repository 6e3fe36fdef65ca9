"""Mixed load for bench/reliability.py: Locust users on loopback, each picking a request shape by weight.

Shapes: short dpm-solver++ (n 1-4), ddim 50 steps, the full 1000-step ddpm, a job with previews watched over its
event stream, a 1000-step job cancelled after a moment, and a client that gives up mid-request. Every outcome is
recorded (latency, status, images received, Retry-After on 503) and written to $RELIABILITY_OUT at the end.
"""

from __future__ import annotations

import json
import os
import random
import time

import httpx
from locust import HttpUser, between, events, task

RECORDS: list[dict] = []


def record(shape: str, t0: float, status: int, images: int = 0, retry_after: str | None = None) -> None:
    RECORDS.append({"shape": shape, "latency_s": time.perf_counter() - t0, "status": status, "images": images,
                    "retry_after": retry_after})


class Client(HttpUser):
    wait_time = between(0.1, 0.5)

    def _generate(self, shape: str, body: dict, timeout: float = 300) -> None:
        t0 = time.perf_counter()
        with self.client.post("/generate", json=body, name=shape, timeout=timeout, catch_response=True) as r:
            images = len(r.json()["images"]) if r.status_code == 200 else 0
            record(shape, t0, r.status_code, images, r.headers.get("retry-after"))
            if r.status_code in (200, 503):
                r.success()  # a 503 with Retry-After is the service's documented answer when full

    @task(5)
    def short(self):
        self._generate("short", {"n": random.randint(1, 4), "sampler": "dpm-solver++", "steps": 20})

    @task(3)
    def ddim(self):
        self._generate("ddim", {"n": random.randint(1, 2), "sampler": "ddim", "steps": 50})

    @task(1)
    def full_ddpm(self):
        self._generate("ddpm-1000", {"n": 1})

    @task(2)
    def job_with_previews(self):
        t0 = time.perf_counter()
        r = self.client.post("/v1/jobs", json={"n": 2, "sampler": "dpm-solver++", "steps": 25, "preview_every": 5},
                             name="job")
        if r.status_code != 202:
            record("job", t0, r.status_code, 0, r.headers.get("retry-after"))
            return
        job_id, kind, images, previews = r.json()["id"], None, 0, 0
        with httpx.stream("GET", f"{self.host}/v1/jobs/{job_id}/events", timeout=300) as s:
            for line in s.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                    previews += kind == "preview"
                elif line.startswith("data: ") and kind in ("completed", "failed", "cancelled"):
                    images = len(json.loads(line[6:]).get("images", []))
                    break
        record("job", t0, 200 if kind == "completed" else 500, images)

    @task(1)
    def cancelled_job(self):
        t0 = time.perf_counter()
        r = self.client.post("/v1/jobs", json={"n": 1, "steps": 1000}, name="job-cancelled")
        if r.status_code == 202:
            time.sleep(random.uniform(0.2, 2.0))
            d = self.client.delete(f"/v1/jobs/{r.json()['id']}", name="job-cancel")
            state = d.json().get("state") if d.status_code == 200 else None
            record("cancelled-job", t0, 200 if state in ("cancelled", "succeeded") else d.status_code,
                   1 if state == "succeeded" else 0)
        else:
            record("cancelled-job", t0, r.status_code, 0, r.headers.get("retry-after"))

    @task(1)
    def gives_up(self):
        t0 = time.perf_counter()
        try:
            httpx.post(f"{self.host}/generate", json={"n": 1, "steps": 1000}, timeout=1.0)
        except httpx.TimeoutException:
            record("gave-up", t0, 0)


@events.test_stop.add_listener
def dump(environment, **_):
    out = os.environ.get("RELIABILITY_OUT")
    if out:
        with open(out, "w") as f:
            json.dump(RECORDS, f)
