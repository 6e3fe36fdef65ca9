"""Reliability under mixed load, with Locust (headless, loopback): two back-to-back runs against one service.

    python bench/reliability.py --users 64 --duration 300 --out docs/reliability.md

Per run: images/s, goodput (requests answered within 3x the latency of the same shape alone), p50/p90/p99 per
shape, the share of 503s and whether each carried Retry-After; around the runs: the service's RSS (growth after
warm-up should stay under 50 MB), and a reconciliation of counts (every request answered, images received equal the
images metric's increase, nothing left queued or active). Bounded in users and time; traffic only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402
from service_load import header, service  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOLO = {"short": {"n": 4, "sampler": "dpm-solver++", "steps": 20}, "ddim": {"n": 2, "sampler": "ddim", "steps": 50},
        "ddpm-1000": {"n": 1}, "job": {"n": 2, "sampler": "dpm-solver++", "steps": 25}}


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--duration", type=int, default=300, help="seconds per run")
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--weights", default="weights/celeba32-cpu.safetensors")
    p.add_argument("--settle", type=float, default=12.0,
                   help="seconds idle after each run before the RSS is read (past one MALLOC_TRIM_S period)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    lines = header(f"Reliability under mixed load ({a.users} Locust users, {a.runs} x {a.duration} s)", argv,
                   __file__)
    procs = []
    # the service's own defaults: max batch 16, queue 64
    with service(a.weights, 16, ["--queue-size", "64"], on_start=procs.append) as url:
        proc = procs[0]
        solo = {}
        for shape, body in SOLO.items():  # each shape alone, for goodput
            t0 = time.perf_counter()
            if shape == "job":
                j = httpx.post(url + "/v1/jobs", json=body).json()
                while httpx.get(f"{url}/v1/jobs/{j['id']}").json()["state"] != "succeeded":
                    time.sleep(0.02)
            else:
                assert httpx.post(url + "/generate", json=body, timeout=120).status_code == 200
            solo[shape] = time.perf_counter() - t0
        lines += ["Solo latency per shape (alone on the service): " +
                  ", ".join(f"{k} {v:.2f} s" for k, v in solo.items()) + ".", ""]
        time.sleep(a.settle)
        rss = [rss_mb(proc.pid)]
        lines += ["| run | requests | images/s | goodput | 503s (with Retry-After) | p50 / p90 / p99 s, short | "
                  "p50 / p90 / p99 s, ddpm-1000 | images received | images metric | left queued/active |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for run in range(a.runs):
            images0 = metric(url, "celeba_ddpm_images_generated_total")
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = f.name
            t0 = time.perf_counter()
            subprocess.run(["locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "-u", str(a.users),
                            "-r", "8", "-t", f"{a.duration}s", "--host", url, "--only-summary",
                            "--stop-timeout", "120"], check=False, env={**os.environ, "RELIABILITY_OUT": out},
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            time.sleep(3)
            recs = json.loads(Path(out).read_text())
            answered = [r for r in recs if r["status"] != 0]
            ok = [r for r in answered if r["status"] == 200]
            s503 = [r for r in answered if r["status"] == 503]
            good = [r for r in ok if r["shape"] in solo and r["latency_s"] <= 3 * solo[r["shape"]]]
            graded = [r for r in answered if r["shape"] in solo]
            received = sum(r["images"] for r in recs)
            made = metric(url, "celeba_ddpm_images_generated_total") - images0
            ready = httpx.get(url + "/readyz").json()

            def pct(shape):
                lat = [r["latency_s"] for r in ok if r["shape"] == shape]
                return " / ".join(f"{np.percentile(lat, q):.2f}" for q in (50, 90, 99)) if lat else "-"

            time.sleep(a.settle)  # idle, so the service's periodic malloc_trim has run (MALLOC_TRIM_S)
            rss.append(rss_mb(proc.pid))
            lines.append(f"| {run + 1} | {len(recs)} | {made / wall:.2f} | {len(good)}/{len(graded)} "
                         f"({100 * len(good) / max(1, len(graded)):.0f}%) | {len(s503)} "
                         f"({sum(r['retry_after'] is not None for r in s503)}) | {pct('short')} | "
                         f"{pct('ddpm-1000')} | {received} | {made:.0f} | {ready['queued_requests']}/"
                         f"{ready['active_samples']} |")
            print(lines[-1], flush=True)
        lines += ["", f"Service RSS: {rss[0]:.0f} MB after warm-up, " +
                  ", ".join(f"{r:.0f} MB after run {i + 1}" for i, r in enumerate(rss[1:])) +
                  f" (growth across the two runs after the first: {rss[-1] - rss[1]:+.0f} MB; target < 50 MB).", ""]
    emit(lines, a.out, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
