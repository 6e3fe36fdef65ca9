"""What job previews and event streams cost, measured through the running service on loopback.

    # images/s of 16 concurrent 1000-step ddpm jobs, without previews and with previews every 10 steps (each job
    # watched by one event stream that receives and decodes its previews), alternated A B A B
    python bench/jobs.py previews --weights weights/celeba32-cpu.safetensors --out bench/results/jobs-cpu.md
    # /generate latency with 0 and 200 open event streams on a running job
    python bench/jobs.py streams --weights weights/celeba32-cpu.safetensors --out bench/results/jobs-cpu.md

A benchmark, not a test: it prints a table and appends it to --out with date, machine and command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402
from service_load import header, service  # noqa: E402


def watch(url: str, job_id: str, stop: threading.Event | None = None, counts: dict | None = None) -> None:
    """Read a job's event stream to its end (or until `stop`), counting events by kind."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=None) as r:
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
                if counts is not None:
                    counts[kind] = counts.get(kind, 0) + 1
                if kind in ("completed", "failed", "cancelled"):
                    return
            if stop is not None and stop.is_set():
                return


def run_jobs(url: str, jobs: int, steps: int, preview_every: int) -> tuple[float, dict]:
    """Seconds from the first submission to the last image, and the events seen."""
    counts: dict = {}
    t0 = time.perf_counter()
    ids = [httpx.post(url + "/v1/jobs", json={"n": 1, "seed": i, "steps": steps, "preview_every": preview_every},
                      timeout=30).json()["id"] for i in range(jobs)]
    threads = [threading.Thread(target=watch, args=(url, i, None, counts)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    states = {httpx.get(f"{url}/v1/jobs/{i}").json()["state"] for i in ids}
    assert states == {"succeeded"}, states
    return dt, counts


def previews(a, argv) -> list[str]:
    lines = header("Cost of previews (jobs)", argv, __file__)
    lines += [f"{a.jobs} concurrent jobs of `{{\"n\": 1, \"steps\": {a.steps}}}` (ddpm), max batch {a.jobs}, each "
              "watched by one event stream; previews every 10 steps: x0 estimate for that row, uint8, PNG-encoded "
              "off the denoising thread, base64 on the stream.", "",
              "| run | previews | seconds | images/s | preview events |", "|---|---|---|---|---|"]
    results = {0: [], 10: []}
    with service(a.weights, a.jobs, ["--max-n", "16"]) as url:
        for r in range(a.repeats):
            for every in (0, 10):
                dt, counts = run_jobs(url, a.jobs, a.steps, every)
                results[every].append(a.jobs / dt)
                lines.append(f"| {r + 1} | {'every 10 steps' if every else 'none'} | {dt:.1f} | {a.jobs / dt:.3f} | "
                             f"{counts.get('preview', 0)} |")
                print(lines[-1], flush=True)
    base, prev = np.median(results[0]), np.median(results[10])
    lines += ["", f"Median images/s: {base:.3f} without previews, {prev:.3f} with: previews cost "
              f"{100 * (1 - prev / base):.1f}% (target: at most 5%).", ""]
    return lines


def hold(url: str, job_id: str, count: int, stop: threading.Event) -> None:
    """`count` open streams read by one thread with a selector, without parsing: the cheapest client, since the
    cores are shared with the service."""
    import selectors
    import socket

    host, port = url.removeprefix("http://").split(":")
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)))
        s.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    try:
        while not stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                try:
                    if not key.fileobj.recv(65536):
                        sel.unregister(key.fileobj)
                except BlockingIOError:
                    pass
    finally:
        for s in socks:
            s.close()


def streams(a, argv) -> list[str]:
    lines = header("Cost of open event streams", argv, __file__)
    body = json.loads(a.body)
    rows = []
    with service(a.weights, 16) as url:
        def latencies() -> list[float]:
            out = []
            for i in range(a.requests):
                t0 = time.perf_counter()
                r = httpx.post(url + "/generate", json={**body, "seed": i}, timeout=120)
                assert r.status_code == 200, r.text
                out.append(time.perf_counter() - t0)
            return out

        httpx.post(url + "/generate", json=body, timeout=120)  # warm
        for open_streams in (0, a.streams, 0, a.streams):
            watched = httpx.post(url + "/v1/jobs", json={"n": 1, "seed": 1, "steps": 1000}, timeout=30).json()["id"]
            stop = threading.Event()
            threads = [threading.Thread(target=hold, args=(url, watched, open_streams, stop), daemon=True)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while open_streams and _gauge(url, "celeba_ddpm_open_event_streams") < open_streams:
                assert time.monotonic() < deadline, "streams did not open"
                time.sleep(0.05)
            lat = latencies()
            stop.set()
            httpx.delete(f"{url}/v1/jobs/{watched}")  # ends the streams (their last event: cancelled)
            rows.append((open_streams, float(np.median(lat)), float(np.percentile(lat, 90))))
            print(rows[-1], flush=True)
            for t in threads:
                t.join(timeout=10)
    lines += [f"`/generate` with `{a.body}`, {a.requests} requests one after another, while a 1000-step job runs; "
              f"0 or {a.streams} open event streams on that job, each receiving its progress events (at most 2 a "
              "second), read by one client thread with a selector; it runs on the same 2 cores as the service.",
              "", "| open streams | median s | p90 s |", "|---|---|---|"]
    lines += [f"| {n} | {m:.3f} | {p:.3f} |" for n, m, p in rows]
    none = np.median([m for n, m, _ in rows if n == 0])
    many = np.median([m for n, m, _ in rows if n])
    lines += ["", f"Median of medians: {none:.3f} s with none, {many:.3f} s with {a.streams}: "
              f"{100 * (many / none - 1):+.1f}% (target: within 10%).", ""]
    return lines


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["previews", "streams"])
    p.add_argument("--weights", default="weights/celeba32-cpu.safetensors")
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--body", default='{"n": 1, "sampler": "ddim", "steps": 50}')
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    lines = previews(a, argv) if a.what == "previews" else streams(a, argv)
    emit(lines, a.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
