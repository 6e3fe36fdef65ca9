"""cpu32 beside an mp-unet distilled from it (model/mp_unet.py, train/distill.py), timed on this CPU: ORT graph nodes,
the batch-1 forward (2 spinning threads, and 1 thread) and the 1000-step ddpm chain at batch 1 through the engine
(with SPIN_THREADS and with the defaults), interleaved so that both see the same machine.

    python bench/mp_student.py weights/celeba32-cpu-mp.safetensors --rounds 5 --out bench/results/mp-student-cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from report import command, emit, stamp  # noqa: E402


def main(argv=None) -> None:
    import onnxruntime as ort

    from cheaper_networks import optimized_nodes
    from model.engine import SamplerEngine, generate
    from model.runner_onnx import export
    from runner import time_interleaved
    from runner_profile import as_fn, session

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("student", help="mp-unet weights (.safetensors, from train.distill and train.export)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="the U-Net it was distilled from (cpu32)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chain-steps", type=int, default=1000)
    p.add_argument("--min-seconds", type=float, default=0.3, help="per graph per forward round")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    w, s = load_weights(a.weights), load_weights(a.student)
    if s.metadata.get("architecture") != "mp-unet":
        raise SystemExit(f"error: {a.student}: not mp-unet weights")
    teacher, student = f"teacher, {Path(a.weights).name}", f"mp-unet, {Path(a.student).name}"
    nets = {teacher: w.unet.eval(), student: s.unet}
    options = ((2, True), (1, False))  # (ORT intra-op threads, spinning): SPIN_THREADS and the service's default
    rows, chains, fns = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, net) in enumerate(nets.items()):
            path = Path(tmp) / f"{i}.onnx"
            export(net, path)
            rows[name] = {"nodes": optimized_nodes(path)}
            for threads, spin in options:
                fns[(name, threads, spin)] = as_fn(session(path, threads, spin))
        c = w.unet.config
        x, t = torch.randn(1, c.in_channels, c.image_size, c.image_size), torch.tensor([500.0])
        with torch.inference_mode():  # the timer checks the teacher's graphs against the teacher; this, the student's
            for threads, spin in options:
                torch.testing.assert_close(fns[(student, threads, spin)](x, t), nets[student](x, t), rtol=1e-4,
                                           atol=1e-4)
        labels = {f"{name}, {threads} thread(s)": (name, threads, spin) for name, threads, spin in fns}
        [(_, timed)] = time_interleaved({label: fns[key] for label, key in labels.items()}, nets[teacher], [1],
                                        a.rounds * 3, a.min_seconds,
                                        unchecked=frozenset(k for k, v in labels.items() if v[0] == student))
        for label, (name, threads, spin) in labels.items():
            rows[name][(threads, spin)] = timed[label]
        for spin in (True, False):
            engines = {k: SamplerEngine(v, w.diffusion, "cpu", torch.float32, runner="onnx", cache_dir=Path(tmp),
                                        spin=spin) for k, v in nets.items()}
            for e in engines.values():
                generate(e, [7], "ddpm", 20, 1)  # build the chain sessions
            runs = {k: [] for k in engines}
            for _ in range(a.rounds):
                for k, e in engines.items():
                    t0 = time.perf_counter()
                    generate(e, [7], "ddpm", a.chain_steps, 1)
                    runs[k].append(time.perf_counter() - t0)
            for k, v in runs.items():
                chains[(k, spin)] = (min(v), statistics.median(v))
    lines = ["# A network without GroupNorm: cpu32 beside an mp-unet distilled from it (bench/mp_student.py)", "",
             f"{stamp()}, "
             f"torch {torch.__version__}, onnxruntime {ort.__version__}",
             f"- command: `{command(__file__)}`",
             "",
             f"ms per batch-1 forward, best (median) of {a.rounds * 3} interleaved rounds of ~{a.min_seconds} s; "
             "seconds for "
             f"the {a.chain_steps}-step ddpm chain at batch 1 through the engine (10 chained steps per ORT call), "
             f"best (median) of {a.rounds} interleaved runs:", "",
             "| network | ORT nodes | forward, 2 threads spinning | forward, 1 thread | chain, SPIN_THREADS | chain, "
             "default |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        cells = [f"{r[k][0]:.2f} ({r[k][1]:.2f})" for k in ((2, True), (1, False))]
        cells += [f"{chains[(name, s)][0]:.2f} ({chains[(name, s)][1]:.2f})" for s in (True, False)]
        lines.append(f"| {name} | {r['nodes']} | " + " | ".join(cells) + " |")
    emit(lines, a.out, append=True)


if __name__ == "__main__":
    main()
