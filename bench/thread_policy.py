"""OpenMP thread policy for the CPU service: U-Net forward time under each policy, alone and beside a busy process.

    python bench/thread_policy.py --out bench/results/thread-policy-cpu.md

Each policy runs in a fresh process (OpenMP reads its environment once, at start). "busy neighbour": another
process keeps both cores busy with a 2-thread matmul loop, as a second service or a training run on the same
host would. ACTIVE spin-waiting between ops is fastest alone but can collapse when the cores are shared;
PASSIVE threads sleep between ops and pay a wake-up per op; GOMP_SPINCOUNT bounds the spin before sleeping.
A second table does the same for ONNX Runtime's options (its own thread pool, spinning or not, vs the runner's
single-threaded shards). A third times what a lone request runs, the engine's 1000-step ddpm chain at batch 1
(chained steps, model/onnx_chain.py), with SPIN_THREADS false, true and auto, alone and beside a neighbour busy on
one core or on both; for auto it also counts the runner calls that spun. `--tables` picks the tables; `--out`
adds to the results file.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from report import command, emit, stamp

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

# ONNX Runtime's own thread pool (model/runner_onnx.py): its idle threads spin unless allow_spinning=0. The runner
# splits the batch into single-threaded sessions instead (nothing to spin); both are measured here.
ORT_OPTIONS = {
    "ORT: 2 shards x 1-thread session, no spinning (the runner's default)": "runner",
    "ORT: 1 session x 2 threads, spinning (ORT's default; the runner's at batch 1 with SPIN_THREADS)": "spin",
    "ORT: 1 session x 2 threads, allow_spinning=0": "nospin",
}

PROBE_ORT = r"""
import sys, time, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from model.runner import ModelRunner
from model.runner_onnx import OnnxUNet
from model.unet import PRESETS, UNet
torch.manual_seed(0)
batch, reps, option, cache = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], Path(sys.argv[5])
m = UNet(PRESETS["cpu32"]).eval()
if option == "runner":
    f = ModelRunner(m, torch.device("cpu"), torch.float32, torch.channels_last, "onnx", 2, cache_dir=cache)
else:
    f = OnnxUNet(m, cache, threads=2, spinning=option == "spin")
x = torch.randn(batch, 3, 32, 32)
t = torch.full((batch,), 500.0)
with torch.inference_mode():
    for _ in range(10):
        f(x, t)
    for _ in range(reps):
        t0 = time.perf_counter(); f(x, t); print(time.perf_counter() - t0)
"""

# the 1000-step chain at batch 1 through the engine, as the service runs a lone request (after its warm-up)
PROBE_ENGINE = r"""
import collections, sys, time, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from model.engine import SamplerEngine, generate
from model.weights import load_weights
reps, option, cache, weights = int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
w = load_weights(weights)
e = SamplerEngine(w.unet, w.diffusion, runner="onnx", workers=2, cache_dir=cache,
                  spin={"false": False, "true": True, "auto": "auto"}[option])
e.runner.build_spinning_sessions()
threads, count = e.runner._threads, collections.Counter()
def counted(shards):
    n = threads(shards)
    count[n > 1] += 1
    return n
e.runner._threads = counted
generate(e, [0], "ddpm", 300)  # sessions warm, and auto's load window filled
count.clear()
for r in range(reps):
    t0 = time.perf_counter(); generate(e, [r], "ddpm", 1000); print(time.perf_counter() - t0)
print("spun", count[True] / max(1, sum(count.values())))
"""
ENGINE_OPTIONS = ("false", "true", "auto")
NEIGHBOURS = {"alone": 0, "busy neighbour, 1 core": 1, "busy neighbour, 2 cores": 2}
BUSY = "import sys, torch\ntorch.set_num_threads(int(sys.argv[1]))\na = torch.randn(384, 384)\nwhile True:\n    a @ a\n"


def _probe(args: list[str], env: dict) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", *args], env={**clean, **env},
                       capture_output=True, text=True, timeout=600, check=True)
    return r.stdout.split("\n")


def measure(env: dict, batch: int, reps: int, ort_option: str | None = None, cache: str = "") -> float:
    args = [PROBE_ORT if ort_option else PROBE, str(ROOT), str(batch), str(reps)]
    args += [ort_option, cache] if ort_option else []
    return statistics.median(float(x) for x in _probe(args, env) if x) * 1e3


def measure_engine(option: str, reps: int, cache: str, weights: str) -> tuple[float, float]:
    """(median seconds of `reps` 1000-step chains at batch 1, share of runner calls that spun)."""
    lines = [x for x in _probe([PROBE_ENGINE, str(ROOT), str(reps), option, cache, weights],
                               {"OMP_WAIT_POLICY": "PASSIVE"}) if x]
    return statistics.median(float(x) for x in lines[:-1]), float(lines[-1].split()[1])


@contextmanager
def neighbour(cores: int):
    """Another process busy on `cores` cores (none for 0) while the block runs."""
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(cores)]) if cores else None
    try:
        time.sleep(1 if busy else 0)
        yield
    finally:
        if busy:
            busy.kill()
            busy.wait()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", nargs="+", choices=["omp", "ort", "engine"], default=["omp", "ort", "engine"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2, help="repeat the whole table, interleaved (noisy machines)")
    p.add_argument("--ort-batch", type=int, nargs="*", default=[1, 4], help="batch sizes for the ORT table")
    p.add_argument("--engine-reps", type=int, default=2, help="1000-step chains per engine run")
    p.add_argument("--weights", default=str(ROOT / "weights" / "celeba32-cpu.safetensors"), help="engine table")
    p.add_argument("--out", default=None, help="results file to add to")
    a = p.parse_args(argv)
    import tempfile

    cache = tempfile.mkdtemp(prefix="onnx-cache-")  # one export, shared by the ORT probes
    results: dict[tuple[str, str], list] = {}
    for _ in range(a.rounds):
        for cond in ("alone", "busy neighbour") if {"omp", "ort"} & set(a.tables) else ():
            with neighbour(2 if cond != "alone" else 0):
                for name, env in POLICIES.items() if "omp" in a.tables else ():
                    results.setdefault((name, cond), []).append(measure(env, a.batch, a.reps))
                for b in a.ort_batch if "ort" in a.tables else ():
                    for name, option in ORT_OPTIONS.items():
                        results.setdefault((f"{name}, batch {b}", cond), []).append(
                            measure({"OMP_WAIT_POLICY": "PASSIVE"}, b, a.reps, option, cache))
        for cond, cores in NEIGHBOURS.items() if "engine" in a.tables else ():
            with neighbour(cores):
                for option in ENGINE_OPTIONS:
                    results.setdefault((option, cond), []).append(measure_engine(option, a.engine_reps, cache,
                                                                                 a.weights))
    lines = [f"# Thread policy on the CPU: {', '.join(a.tables)}", "",
             stamp(),
             f"- command: `{command(__file__, argv)}`",
             f"- {a.rounds} interleaved rounds (each run listed); a busy neighbour is another process in a matmul loop"]
    if "omp" in a.tables:
        lines += ["", f"OpenMP, cpu32 U-Net forward at batch {a.batch} on 2 threads, median ms of {a.reps}:", "",
                  "| policy | alone, ms | busy neighbour, ms |", "| --- | --- | --- |"]
        for name in POLICIES:
            cells = [" / ".join(f"{v:.1f}" for v in results[name, c]) for c in ("alone", "busy neighbour")]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    if "ort" in a.tables:
        lines += ["", f"ONNX Runtime (model/runner_onnx.py), cpu32 U-Net, OMP_WAIT_POLICY=PASSIVE for torch, median "
                  f"ms of {a.reps}:", "", "| option | alone, ms | busy neighbour, ms |", "| --- | --- | --- |"]
        for b in a.ort_batch:
            for name in ORT_OPTIONS:
                key = f"{name}, batch {b}"
                cells = [" / ".join(f"{v:.1f}" for v in results[key, c]) for c in ("alone", "busy neighbour")]
                lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    if "engine" in a.tables:
        lines += ["", f"The engine's 1000-step ddpm chain at batch 1 ({Path(a.weights).name}, chained steps, "
                  f"OMP_WAIT_POLICY=PASSIVE), median s of {a.engine_reps} per run; for auto, the share of runner "
                  "calls that spun in brackets:", "",
                  "| SPIN_THREADS | " + " | ".join(f"{c}, s" for c in NEIGHBOURS) + " |",
                  "| --- |" + " --- |" * len(NEIGHBOURS)]
        for option in ENGINE_OPTIONS:
            cells = [" / ".join(f"{sec:.2f}" + (f" ({spun:.0%})" if option == "auto" else "")
                                for sec, spun in results[option, c]) for c in NEIGHBOURS]
            lines.append(f"| {option} | " + " | ".join(cells) + " |")
    emit(lines, a.out, append=True)


if __name__ == "__main__":
    main()
