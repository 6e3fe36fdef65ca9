"""Service benchmark on loopback: request latency, and a bounded load test with N concurrent clients.

    # seconds for {"n": 1} and {"n": 4} at 1000 ddpm steps through the running service, with its default settings
    # (SPIN_THREADS=auto), with SPIN_THREADS true (a batch smaller than the cores on spinning ONNX Runtime threads)
    # and false, and on the TorchScript runner (the service before ONNX Runtime)
    python bench/service_load.py latency --weights weights/celeba32-cpu.safetensors \
        --variants default spin nospin script --out bench/results/service-latency-cpu.md
    # (then the same weights in diffusers' DDPMPipeline at the same batch sizes, for comparison)
    # throughput and p50/p99 latency, continuous batching (max batch 16) vs none (max batch 1), in one run
    python bench/service_load.py load --clients 1 4 16 --duration 60 --max-batch 16 1 \
        --body '{"n": 1, "sampler": "ddim", "steps": 50}' --out bench/results/service-load-cpu.md

Each configuration starts `python -m service` on a free loopback port, waits for /readyz, and stops it
afterwards. Clients send requests back to back until the duration is over; every accepted request must come
back with its images (checked), and the run fails loudly otherwise. Traffic only goes to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np

from report import command, emit, stamp

ROOT = Path(__file__).resolve().parent.parent
READY_S: list[float] = []  # seconds from start to /readyz of each service() run (weights load, warm-up, capture)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def service(weights: str, max_batch: int, extra: list[str] | None = None, on_start=None):
    """Yield the URL of `python -m service` on a free loopback port once /readyz answers; on_start(proc) if given.
    extra flags come last, so they override the defaults here (e.g. --queue-size)."""
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--weights", weights, "--port", str(port), "--host",
                             "127.0.0.1", "--max-batch", str(max_batch), "--queue-size", "1024",
                             "--log-level", "warning", *(extra or [])], cwd=ROOT)
    if on_start is not None:
        on_start(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 120:
                raise RuntimeError("service did not start")
            time.sleep(0.1)
        READY_S.append(time.monotonic() - t0)
        print(f"service ready in {READY_S[-1]:.1f} s (max batch {max_batch})", flush=True)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def header(title: str, argv, script: str = __file__) -> list[str]:
    return [f"# {title}", "",
            f"{stamp()}, "
            f"python {platform.python_version()}",
            f"- command: `{command(script, argv)}`", ""]


def summary(measured, theirs: dict) -> list[str]:
    """Median and best end-to-end seconds per (n, variant) of latency()'s requests."""
    out = ["", "| n | service flags | requests | best s | median s | median speed-up over DDPMPipeline |",
           "| --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple[int, str], list[float]] = {}
    for variant, n, dt, _ in measured:
        groups.setdefault((n, variant), []).append(dt)
    for (n, variant), dts in groups.items():
        med = float(np.median(dts))
        up = f"{theirs[n] / med:.2f}x" if n in theirs else "-"
        out.append(f"| {n} | {' '.join(VARIANTS[variant]) or 'defaults'} | {len(dts)} | {min(dts):.2f} | {med:.2f} | "
                   f"{up} |")
    return out


# service flags measured side by side in latency; "script" is the TorchScript runner, the service's before ONNX
# Runtime's, so a run on a slow day of this VM can still say in its own figures how far the ONNX runner moved from it
VARIANTS = {"default": [], "spin": ["--spin-threads", "true"], "nospin": ["--spin-threads", "false"],
            "script": ["--runner", "script"]}


def latency(a, argv) -> str:
    """1000-step ddpm requests one at a time through the service; then, with the service stopped, the same
    weights in diffusers' DDPMPipeline (a plain diffusers deployment's compute) at the same batch sizes."""
    baseline = a.baseline_weights or a.weights
    measured = []
    with ExitStack() as stack:  # every variant's service up at once (an idle one sleeps), requests interleaved
        urls = {v: stack.enter_context(service(a.weights, a.max_batch[0], VARIANTS[v])) for v in a.variants}
        for r in range(a.repeat):
            for n in a.n:
                for variant, url in urls.items():
                    t0 = time.perf_counter()
                    resp = httpx.post(url + "/generate", json={"n": n, "seed": r}, timeout=3600)
                    dt = time.perf_counter() - t0
                    assert resp.status_code == 200 and len(resp.json()["images"]) == n, resp.text[:200]
                    measured.append((variant, n, dt, resp.json()["timings"]))
                    print(f"{variant} n={n}: {dt:.2f} s", flush=True)
        infos = {v: httpx.get(url + "/v1/model", timeout=10).json() for v, url in urls.items()}
    measured.sort(key=lambda m: (m[1], a.variants.index(m[0])))  # table rows by n, then variant
    info = infos[a.variants[0]]
    device, dtype_name = info.get("device", "cpu"), info.get("dtype", "fp32")
    runners = ", ".join(f"{' '.join(VARIANTS[v]) or 'defaults'}: `{i.get('runner')}`" for v, i in infos.items())
    theirs = {}
    if a.diffusers:
        import torch
        from sampler import time_diffusers  # bench/sampler.py (this folder); it puts the project on sys.path

        from model.device import DTYPES
        from model.weights import load_weights

        torch.set_num_threads(a.threads or os.cpu_count())
        w = load_weights(baseline)
        for n in a.n:  # on the service's device and dtype
            theirs[n] = time_diffusers(w, torch.device(device), DTYPES[dtype_name], n, 1000)
            print(f"diffusers n={n}: {theirs[n]:.2f} s", flush=True)
    rows = []
    for variant, n, dt, t in measured:
        d = f"{theirs[n]:.2f} | {theirs[n] / dt:.2f}x" if n in theirs else "- | -"
        flags = " ".join(VARIANTS[variant]) or "defaults"
        rows.append(f"| {n} | {flags} | 1000 (ddpm) | {dt:.2f} | {t['queue_s']:.3f} | {t['generate_s']:.2f} | {d} |")
    return "\n".join(header("Service latency, 1000-step ddpm requests, one at a time", argv) + [
        ("diffusers: the same weights" if not a.baseline_weights else
         f"diffusers: other weights, {a.baseline_weights} (the service's are distilled from them),")
        + " in diffusers' DDPMPipeline (UNet2DModel, or for an mp-unet MPUNet2DModel, via model/diffusers_compat.py, "
        f"DDPMScheduler with the same schedule and prediction type, no clipping), same batch size, {device} "
        f"{dtype_name}, run after the service stopped; it returns arrays, so it has no HTTP or PNG work to do. "
        f"The services (one per variant, all up at once, requests interleaved: variant after variant, "
        f"{a.repeat} round(s)) were ready {READY_S[0]:.1f} s after they started and ran the U-Net on these runners "
        f"({runners}) "
        "with OMP_WAIT_POLICY=PASSIVE (its setting); "
        "diffusers with OMP_WAIT_POLICY "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset (libgomp default: its best alone)')}.",
        "",
        "| n | service flags | steps | service end-to-end s | queue s | generate s | diffusers DDPMPipeline s | "
        "service speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"] + rows + summary(measured, theirs)) + "\n"


def load(a, argv) -> str:
    body = json.loads(a.body)
    rows = []
    for max_batch in a.max_batch:
        with service(a.weights, max_batch) as url:
            for clients in a.clients:
                lat, errors, images = [], [], 0
                lock = threading.Lock()
                end = time.monotonic() + a.duration

                def client(i):
                    nonlocal images
                    k = 0
                    with httpx.Client(timeout=3600) as c:
                        while time.monotonic() < end:
                            t0 = time.perf_counter()
                            r = c.post(url + "/generate", json={**body, "seed": 1000 * i + k})
                            dt = time.perf_counter() - t0
                            k += 1
                            with lock:
                                if r.status_code == 200 and len(r.json()["images"]) == body.get("n", 1):
                                    lat.append(dt)
                                    images += body.get("n", 1)
                                else:
                                    errors.append(r.status_code)

                t_start = time.perf_counter()
                threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t_start
                if errors:
                    raise SystemExit(f"{len(errors)} requests failed: {sorted(set(errors))}")
                p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
                rows.append(f"| {max_batch} | {clients} | {len(lat)} | {images / wall:.2f} | {p50:.2f} | {p99:.2f} |")
                print(rows[-1], flush=True)
    return "\n".join(header(f"Service load: {json.dumps(body)} for {a.duration:.0f} s per row", argv) + [
        "Every accepted request came back with its images (checked); no request failed. Seconds from start to "
        f"ready (weights, warm-up of every batch size): {', '.join(f'{r:.1f}' for r in READY_S)}.", "",
        "| max batch | clients | requests | images/s | p50 s | p99 s |", "| --- | --- | --- | --- | --- | --- |"]
        + rows) + "\n"


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    # `timeout` and Ctrl-C stop the benchmark through its finally blocks, which stop the services it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["latency", "load"])
    p.add_argument("--weights", default=str(ROOT / "weights" / "celeba32-cpu.safetensors"))
    p.add_argument("--n", type=int, nargs="+", default=[1, 4], help="latency: images per request")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["default"],
                   help="latency: service settings to measure, one service each (default: SPIN_THREADS auto; "
                   "spin / nospin: --spin-threads true / false; script: --runner script)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false",
                   help="latency: skip the diffusers DDPMPipeline comparison")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the diffusers run (default: all)")
    p.add_argument("--baseline-weights", default=None,
                   help="latency: weights for the DDPMPipeline run (default: --weights, the same; e.g. the U-Net an "
                        "mp-unet was distilled from)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--max-batch", type=int, nargs="+", default=[16])
    p.add_argument("--body", default='{"n": 1, "sampler": "ddim", "steps": 50}')
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    text = latency(a, argv) if a.mode == "latency" else load(a, argv)
    emit(text, a.out, append=True)  # results files keep every run
    return 0


if __name__ == "__main__":
    sys.exit(main())
