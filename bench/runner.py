"""U-Net forward time by runner (model/runner.py): eager, frozen TorchScript, and TorchScript in one shard per thread.

Interleaved rounds (A, B, C, A, B, C, ...) so a slow spell on a noisy machine hits every runner alike; the
table shows the best round and the median, and each runner's speed-up over eager in the same run.

    python bench/runner.py --weights weights/celeba32-cpu.safetensors --batch 1 4 16 64 \
        --out bench/results/runner-cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.runner import ModelRunner  # noqa: E402
from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from report import command, emit, stamp  # noqa: E402


def time_interleaved(fns: dict, unet, batches: list[int], rounds: int, min_seconds: float,
                     unchecked: frozenset[str] = frozenset()) -> list[tuple[int, dict[str, tuple[float, float]]]]:
    """For each batch size: every fn's (best, median) ms per forward over interleaved rounds, after a warm-up call
    and a check against the eager module (except the fns named in `unchecked`: graphs that differ on purpose). Also
    used by bench/runner_backends.py and bench/runner_profile.py."""
    cfg = unet.config
    rows = []
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, cfg.in_channels, cfg.image_size, cfg.image_size).contiguous(
                memory_format=torch.channels_last)
            t = torch.randint(0, 1000, (b,)).float()
            ref = unet(x, t)
            reps = {}
            for name, f in fns.items():  # warm up (sessions, traces), check, and size the rounds
                f(x, t)
                if name not in unchecked:
                    torch.testing.assert_close(f(x, t), ref, rtol=1e-4, atol=1e-4, check_stride=False)
                t0 = time.perf_counter()
                f(x, t)
                reps[name] = max(2, int(min_seconds / (time.perf_counter() - t0)))
            times = {name: [] for name in fns}
            for _ in range(rounds):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(reps[name]):
                        f(x, t)
                    times[name].append((time.perf_counter() - t0) / reps[name] * 1e3)
            rows.append((b, {k: (min(v), statistics.median(v)) for k, v in times.items()}))
            print(f"batch {b}: " + ", ".join(f"{k} {min(v):.2f} ms" for k, v in times.items()), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-seconds", type=float, default=0.5, help="per runner per round")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    w = load_weights(a.weights)
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    unet = w.unet.eval().to(memory_format=torch.channels_last)
    runners = {
        "eager": ModelRunner(unet, cpu, torch.float32, torch.channels_last, "eager"),
        "script, 1 shard": ModelRunner(unet, cpu, torch.float32, torch.channels_last, "script", workers=1),
        f"script, {threads} shards": ModelRunner(unet, cpu, torch.float32, torch.channels_last, "script", threads),
    }
    rows = time_interleaved(runners, unet, a.batch, a.rounds, a.min_seconds)

    cfg = unet.config
    names = list(runners)
    lines = [
        "# U-Net forward by runner (model/runner.py)",
        "",
        f"{stamp()}, "
        f"{threads} torch threads, fp32, channels_last, torch {torch.__version__}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- weights: {Path(a.weights).name} ({cfg.image_size}px, base {cfg.base_channels})",
        f"- command: `{command(__file__)}`",
        f"- {a.rounds} interleaved rounds; ms per forward, best round (median); speed-up of the best over eager's best",
        "",
        "| batch | " + " | ".join(names) + " | speed-up, sharded script |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for b, res in rows:
        cells = [f"{res[n][0]:.1f} ({res[n][1]:.1f})" for n in names]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {res[names[0]][0] / res[names[-1]][0]:.2f}x |")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
