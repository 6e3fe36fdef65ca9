"""OpenMP thread policy for the CPU service: U-Net forward time under each policy, alone and beside a busy process.

    python bench/thread_policy.py --out bench/results/thread-policy-cpu.md

Each policy runs in a fresh process (OpenMP reads its environment once, at start). "busy neighbour": another
process keeps both cores busy with a 2-thread matmul loop, as a second service or a training run on the same
host would. ACTIVE spin-waiting between ops is fastest alone but can collapse when the cores are shared;
PASSIVE threads sleep between ops and pay a wake-up per op; GOMP_SPINCOUNT bounds the spin before sleeping.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

POLICIES = {
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_WAIT_POLICY=ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    "libgomp default": {},
}

PROBE = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from model.unet import PRESETS, UNet
torch.set_num_threads(2)
batch, reps = int(sys.argv[2]), int(sys.argv[3])
m = UNet(PRESETS["cpu32"]).eval().to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
t = torch.full((batch,), 500.0)
with torch.inference_mode():
    for _ in range(10):
        m(x, t)
    for _ in range(reps):
        t0 = time.perf_counter(); m(x, t); print(time.perf_counter() - t0)
"""

BUSY = "import torch\ntorch.set_num_threads(2)\na = torch.randn(384, 384)\nwhile True:\n    a @ a\n"


def measure(env: dict, batch: int, reps: int) -> float:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), str(batch), str(reps)], env={**clean, **env},
                       capture_output=True, text=True, timeout=600, check=True)
    return statistics.median(float(x) for x in r.stdout.split()) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2, help="repeat the whole table, interleaved (noisy machines)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for cond in ("alone", "busy neighbour"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if cond != "alone" else None
            try:
                time.sleep(1 if busy else 0)
                for name, env in POLICIES.items():
                    results.setdefault((name, cond), []).append(measure(env, a.batch, a.reps))
            finally:
                if busy:
                    busy.kill()
                    busy.wait()
    lines = [f"# OpenMP thread policy: cpu32 U-Net forward at batch {a.batch}, 2 threads",
             "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}, machine: {platform.machine()}, {os.cpu_count()} cores",
             f"- command: `python bench/thread_policy.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- median ms of {a.reps} forwards per run; {a.rounds} interleaved rounds (each run listed)",
             "",
             "| policy | alone, ms | busy neighbour, ms |",
             "| --- | --- | --- |"]
    for name in POLICIES:
        cells = [" / ".join(f"{v:.1f}" for v in results[name, c]) for c in ("alone", "busy neighbour")]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
