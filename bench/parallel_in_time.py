"""Parallel-in-time sampling of the same 1000-step `ddpm` chain on this CPU: does trading more U-Net evaluations
for fewer sequential calls beat the serial chain?

Picard iteration over a sliding window (ParaDiGMS: Shih et al. 2023, "Parallel Sampling of Diffusion Models"): with
the chain's noise fixed in advance (the engine's own: x_T and each step's z from the seed), the chain
x_{k+1} = a_k x_k + b_k out(x_k, t_k) + c_k z_k is a fixed point, and a guess for `p` consecutive states is
improved by evaluating the U-Net on all `p` in one batch, then re-running the `p` updates with those outputs (the
update's linear part on the new states: only the U-Net's output lags an iteration). The window slides past the
states that moved by at most `tol` times that step's noise scale c_k (RMS over the image), at least one a time,
since the first state of a window is exact. Converged, every state satisfies the chain's update, so the image is
the serial chain's (checked here against the engine's, pixel by pixel).

It pays where a batch of p costs far less than p batches of 1 (a GPU); this measures whether it does on the 2-core
CPU of issue 21 (`{"n": 1}` in 3 s): the forward's cost per row at each batch, then the serial chain (the engine,
one U-Net call per step and as it runs by default: chained steps) against Picard at each window and tolerance,
interleaved, all on ONNX Runtime with two spinning threads (`SPIN_THREADS`).

    python bench/parallel_in_time.py --rounds 3 --out bench/results/parallel-in-time-cpu.md
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.engine import SamplerEngine, generate, to_uint8  # noqa: E402
from model.noise import gaussian  # noqa: E402
from model.runner_onnx import OnnxUNet  # noqa: E402
from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from report import command, emit, stamp  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)


def picard(forward, x_T: np.ndarray, coef: np.ndarray, z: np.ndarray, window: int, tol: float):
    """The chain's last state by windowed Picard iteration: (x_0, iterations, U-Net rows evaluated).
    forward(x (B, C, H, W), t (B,)) -> the U-Net's output; coef (K, 4): t, a, b, c per step; z (K, C, H, W)."""
    K = len(coef)
    t, a, b, c = (coef[:, i].astype(np.float32) for i in range(4))
    scale = np.maximum(c, c[c > 0].min() if (c > 0).any() else 1.0)  # the last step adds no noise: the smallest
    xs = np.empty((K + 1, *x_T.shape), np.float32)
    xs[0] = x_T
    for k in range(K):  # first guess: the chain with the U-Net's output taken as 0
        xs[k + 1] = a[k] * xs[k] + c[k] * z[k]
    k0 = iterations = evaluated = 0
    while k0 < K:
        k1 = min(k0 + window, K)
        out = forward(xs[k0:k1], t[k0:k1])
        iterations, evaluated = iterations + 1, evaluated + k1 - k0
        moved = np.empty(k1 - k0, np.float32)
        x = xs[k0]
        for j, k in enumerate(range(k0, k1)):
            x = a[k] * x + b[k] * out[j] + c[k] * z[k]
            moved[j] = np.sqrt(np.mean((x - xs[k + 1]) ** 2))
            xs[k + 1] = x
        unsettled = np.nonzero(moved > tol * scale[k0:k1])[0]
        k0 += max(1, unsettled[0] if len(unsettled) else k1 - k0)
        for k in range(k1, min(k0 + window, K)):  # states the window now reaches: guessed from the last one
            xs[k + 1] = a[k] * xs[k] + c[k] * z[k]
    return xs[K], iterations, evaluated


def time_batches(fn: OnnxUNet, threads: int, rounds: int = 5, calls: int = 30) -> dict[int, tuple[float, float]]:
    """ms per forward at each batch, best and median of `rounds`, the batches interleaved."""
    feeds = {b: (np.zeros((b, *fn.shape), np.float32), np.full(b, 500.0, np.float32)) for b in BATCHES}
    times = {b: [] for b in BATCHES}
    for r in range(rounds + 1):
        for b, (x, t) in feeds.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn.run(x, t, threads)
            if r:
                times[b].append((time.perf_counter() - t0) / calls * 1e3)
    return {b: (min(v), statistics.median(v)) for b, v in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--steps", type=int, default=1000, help="ddpm steps of the chain (default 1000)")
    p.add_argument("--windows", type=int, nargs="+", default=[4, 8, 16], help="Picard window sizes (batch)")
    p.add_argument("--tols", type=float, nargs="+", default=[0.01, 0.03],
                   help="Picard tolerances, in units of each step's noise scale")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each way")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import onnxruntime as ort

    w = load_weights(a.weights)
    engine = SamplerEngine(w.unet, w.diffusion, runner="onnx", spin=True)
    if engine.runner.mode != "onnx":
        sys.exit(f"the runner fell back to {engine.runner.mode}: this measures ONNX Runtime")
    threads = engine.runner.workers
    fn = OnnxUNet(w.unet, threads=threads, spinning=True, static_max=max(*BATCHES, *a.windows))
    per_batch = time_batches(fn, threads)

    seed = torch.tensor([a.seed])
    x_T = gaussian(seed, torch.zeros(1, dtype=torch.int64), engine.shape).numpy()[0]  # as the engine draws them
    z = gaussian(seed.repeat(a.steps), torch.arange(1, a.steps + 1), engine.shape).numpy()
    coef = w.diffusion.coefficients("ddpm", a.steps).numpy()[:, :4]

    def in_engine(chain_steps: int):
        engine.runner.chain_steps = chain_steps
        t0 = time.perf_counter()
        image = generate(engine, [a.seed], "ddpm", a.steps, batch_size=1)[0]
        calls = -(-a.steps // chain_steps) if chain_steps else a.steps
        return time.perf_counter() - t0, image, (calls, a.steps)

    def by_picard(window: int, tol: float):
        t0 = time.perf_counter()
        x, iterations, evaluated = picard(lambda x, t: fn.run(x, t, threads), x_T, coef, z, window, tol)
        dt = time.perf_counter() - t0
        return dt, to_uint8(torch.from_numpy(x[None]))[0].numpy(), (iterations, evaluated)

    chained = engine.runner.chain_steps
    ways = {"the engine, one call per step": lambda: in_engine(0),
            f"the engine, {chained} steps per call (default)": lambda: in_engine(chained)}
    ways.update({f"Picard, window {n}, tol {tol:g}": lambda n=n, tol=tol: by_picard(n, tol)
                 for n in a.windows for tol in a.tols})
    times = {name: [] for name in ways}
    counts, diffs = {}, {name: [] for name in ways}
    for r in range(a.rounds + 1):  # round 0 warms up (sessions, caches) and is not timed
        reference = None
        for name, way in ways.items():
            dt, image, count = way()
            if reference is None:
                reference = image.astype(np.int16)
            d = np.abs(image.astype(np.int16) - reference)
            diffs[name].append((int(d.max()), float((d > 1).mean())))
            if r:
                times[name].append(dt)
            counts[name] = count

    first = next(iter(ways))
    best = {name: min(v) for name, v in times.items()}
    lines = [
        "# One 1000-step `ddpm` chain: serial vs parallel in time (Picard iteration), batch 1", "",
        f"{stamp()}, torch {torch.__version__}, onnxruntime {ort.__version__}",
        f"- weights: {Path(a.weights).name}; {a.steps}-step ddpm, seed {a.seed}; ONNX Runtime on {threads} spinning "
        "threads (`SPIN_THREADS`)",
        f"- command: `{command(__file__, argv)}`", "",
        "The U-Net forward, ms, best (median) of 5 interleaved rounds of 30 calls, and per row:", "",
        "| batch | " + " | ".join(map(str, BATCHES)) + " |",
        "| --- |" + " --- |" * len(BATCHES),
        "| forward | " + " | ".join(f"{per_batch[b][0]:.2f} ({per_batch[b][1]:.2f})" for b in BATCHES) + " |",
        "| per row | " + " | ".join(f"{per_batch[b][0] / b:.2f}" for b in BATCHES) + " |", "",
        f"The chain, seconds, best (median) of {a.rounds} interleaved runs; U-Net calls and rows evaluated; the "
        "image against the first way's (largest pixel difference /255, share of pixels more than 1/255 off, "
        "worst round):", "",
        "| way | seconds | vs the first | calls | rows | largest difference | share > 1/255 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ways:
        calls, rows = counts[name]
        worst, share = max(d for d, _ in diffs[name]), max(s for _, s in diffs[name])
        lines.append(f"| {name} | {best[name]:.2f} ({statistics.median(times[name]):.2f}) | "
                     f"{best[first] / best[name]:.2f}x | {calls} | {rows} | {worst} | {share:.2%} |")
    emit(lines, a.out, append=True)


if __name__ == "__main__":
    main()
