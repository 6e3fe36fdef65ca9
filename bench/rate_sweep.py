"""Open-loop rate sweep: requests sent at a fixed rate (not waiting for answers), stepped up until the queue refuses.

    python bench/rate_sweep.py --rates 1 2 4 8 16 32 --duration 30 --out docs/reliability.md --plot docs/rate-sweep.png

Each step sends `--body` at the given rate for `--duration` seconds from a thread pool (loopback only, bounded in
count: rate x duration requests per step), then waits for every answer. Reported per offered rate: images/s
delivered, p50/p99 latency of the answered requests, and the share of 503s (queue full). The knee is where
delivered images/s stops following the offered rate. The plot shows images/s and p99 against offered load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import emit  # noqa: E402
from service_load import header, service  # noqa: E402


def step(url: str, rate: float, duration: float, body: dict) -> dict:
    n = int(rate * duration)
    results = []

    def send(i: int):
        t0 = time.perf_counter()
        try:
            r = httpx.post(url + "/generate", json={**body, "seed": i}, timeout=600)
            return r.status_code, time.perf_counter() - t0
        except httpx.TransportError:
            return 0, time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(256, n)) as ex:
        futures = []
        for i in range(n):  # open loop: the i-th request leaves at start + i / rate, whatever came back
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(ex.submit(send, i))
        results = [f.result() for f in futures]
    wall = time.perf_counter() - start
    ok = [lat for status, lat in results if status == 200]
    return {"rate": rate, "sent": n, "ok": len(ok), "s503": sum(s == 503 for s, _ in results),
            "images_per_s": len(ok) * body.get("n", 1) / wall,
            "p50": float(np.percentile(ok, 50)) if ok else float("nan"),
            "p99": float(np.percentile(ok, 99)) if ok else float("nan")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/celeba32-cpu.safetensors")
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--body", default='{"n": 1, "sampler": "ddim", "steps": 20}')
    p.add_argument("--queue-size", type=int, default=64)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    body = json.loads(a.body)
    rows = []
    with service(a.weights, 16, ["--queue-size", str(a.queue_size)]) as url:
        httpx.post(url + "/generate", json=body, timeout=120)
        for rate in a.rates:
            rows.append(step(url, rate, a.duration, body))
            print(rows[-1], flush=True)
            if rows[-1]["s503"] > 0.5 * rows[-1]["sent"]:
                break  # well past the knee
    lines = header("Open-loop rate sweep", argv, __file__)
    lines += [f"`/generate` with `{a.body}` at a fixed offered rate for {a.duration:g} s per step, max batch 16, "
              f"queue {a.queue_size}.", "", "| offered req/s | sent | answered 200 | 503 (queue full) | images/s | "
              "p50 s | p99 s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rate']:g} | {r['sent']} | {r['ok']} | {r['s503']} | {r['images_per_s']:.2f} | "
              f"{r['p50']:.2f} | {r['p99']:.2f} |" for r in rows]
    lines.append("")
    emit(lines, a.out, append=True)
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        x = [r["rate"] for r in rows]
        ax.plot(x, [r["images_per_s"] for r in rows], "o-", label="images/s delivered")
        ax.plot(x, x, ":", color="grey", label="offered")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("offered requests/s (1 image each)")
        ax.set_ylabel("images/s")
        ax2 = ax.twinx()
        ax2.plot(x, [r["p99"] for r in rows], "s--", color="tab:red", label="p99 latency")
        ax2.set_ylabel("p99 latency, s")
        fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
        ax.set_title("celeba-ddpm on 2 CPU cores: open-loop rate sweep")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
