"""RSS and images delivered over rounds of mixed Locust load against the app in this process: how glibc's malloc
policy decides whether memory settles, and what it costs (docs/reliability.md).

    python bench/rss_rounds.py                                # glibc's default, dynamic mmap threshold
    MALLOC_MMAP_THRESHOLD_=65536 python bench/rss_rounds.py   # a fixed threshold
    MALLOC_ARENA_MAX=2 python bench/rss_rounds.py             # fewer arenas
    CELEBA_DDPM_MALLOC_TRIM_S=10 python bench/rss_rounds.py --settle 12   # the service's malloc_trim

Rounds of 48 Locust users (bench/locustfile.py) for 40 s each against the app on a loopback port; prints the RSS
after start-up and after each round, and the images each round delivered.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402

from service.settings import Settings  # noqa: E402
from service_helpers import running  # noqa: E402  (tests/service_helpers.py: the app under uvicorn in a thread)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=40)
    p.add_argument("--users", type=int, default=48)
    p.add_argument("--settle", type=float, default=2.0, help="seconds idle after each round before reading the RSS")
    a = p.parse_args()
    me = psutil.Process()
    with running(Settings(weights=ROOT / "weights" / "celeba32-cpu.safetensors", max_batch=16, queue_size=64)) as (
            url, _):
        rss, images = [me.memory_info().rss / 2**20], []
        out = Path(tempfile.mkdtemp()) / "records.json"
        for _ in range(a.rounds):
            subprocess.run(["locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "-u", str(a.users),
                            "-r", "8", "-t", f"{a.seconds}s", "--host", url, "--only-summary", "--stop-timeout", "60"],
                           env={**os.environ, "RELIABILITY_OUT": str(out)}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=ROOT, timeout=a.seconds + 120)
            images.append(sum(r["images"] for r in json.loads(out.read_text())))
            time.sleep(a.settle)
            gc.collect()
            rss.append(me.memory_info().rss / 2**20)
    policy = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "CELEBA_DDPM_MALLOC_TRIM_S"
              } or "glibc defaults"
    print(f"{policy}: RSS " + " -> ".join(f"{r:.0f}" for r in rss) + f" MB; images per round {images}")


if __name__ == "__main__":
    main()
