"""Where the batch-1 CPU forward goes: ONNX Runtime's own profile of the runner's graph, by operator type, the
convolutions' FLOP/s against one core's and two cores' matmul peak, and two floors (wrong numbers both): the same
graph with every GroupNorm left out (what the rest costs), and with every GroupNorm and the SiLU after it as one
cheap elementwise node that ORT's NCHWc layout does not cover (what a fused GroupNorm+SiLU custom operator would
cost at best, its layout reorders included). With `--ort-include DIR` (ONNX Runtime's API headers), also the real
thing: the graph with bench/csrc/group_norm_silu.cc's operator in place of each GroupNorm+SiLU, checked against the
module like the runner's graph (bench/fused_group_norm.py). Then the whole step beside its forward, and why the rest
of the step costs what it does.

    python bench/runner_profile.py [--ort-include /tmp/ort/usr/include/onnxruntime] --out bench/results/...

Why it exists: issue 21 asks for 1000 batch-1 steps in 3 s on this 2-core CPU, i.e. 3 ms per step. The profile says
how close the kernels ORT has can come: if the convolutions alone, at the cores' matmul rate, leave no room for the
rest, no thread or graph setting reaches the target, and the next step is a different network or a fused kernel.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from model.engine import SampleSpec, SamplerEngine  # noqa: E402
from model.runner_onnx import export  # noqa: E402
from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from runner import time_interleaved  # noqa: E402  (bench/runner.py)
from sampler import matmul_peak_flops  # noqa: E402  (bench/sampler.py)
from report import command, emit, stamp  # noqa: E402

OPTIONS = ((1, False), (2, False), (2, True))  # (ORT intra-op threads, spinning)
ROUNDS = 9
GRAPHS = ("the runner's graph", "every GroupNorm left out (floor)",
          "every GroupNorm+SiLU as one elementwise op (a fused kernel's best case)")
FUSED_OP = "the runner's graph with its {} GroupNorm(+SiLU) as one custom operator (bench/csrc/group_norm_silu.cc)"


def session(path: Path, threads: int, spinning: bool, profile: bool = False, library: Path | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if library is not None:  # the custom operator of bench/fused_group_norm.py
        so.register_custom_ops_library(str(library))
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.add_free_dimension_override_by_name("batch", 1)
    so.enable_profiling = profile
    so.profile_file_prefix = str(path.with_suffix(""))  # next to the graph, in a temporary folder
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def as_fn(s):
    """A session as `f(x, t)` on torch tensors, for bench/runner.py's interleaved timer."""
    return lambda x, t: torch.from_numpy(s.run(None, {"x": x.contiguous().numpy(), "t": t.numpy()})[0])


def profile(path: Path, feeds, threads: int, runs: int = 200) -> tuple[dict[str, float], float, float]:
    """(us per run by op type, conv us per run, conv FLOPs per run) from ORT's profiler (which slows each op)."""
    s = session(path, threads, spinning=True, profile=True)
    for _ in range(runs):
        s.run(None, feeds)
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_op: dict[str, float] = collections.Counter()
    conv_us, conv_flops = 0.0, 0.0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        op = e["args"]["op_name"]
        by_op[op] += e["dur"] / runs
        if op in ("Conv", "FusedConv"):
            shapes = [list(d.values())[0] for d in e["args"]["input_type_shape"]]
            out = list(e["args"]["output_type_shape"][0].values())[0]
            w = shapes[1]  # (out ch, in ch, kh, kw); the output may be in NCHWc blocks, so take H, W from it
            conv_us += e["dur"] / runs
            conv_flops += 2 * out[0] * w[0] * out[2] * out[3] * w[1] * w[2] * w[3] / runs
    return dict(by_op), conv_us, conv_flops


class _NoNorm(nn.Module):
    def forward(self, x):
        return x


class _OneOp(nn.Module):
    def forward(self, x):
        return torch.abs(x)  # one cheap NCHW node outside ORT's NCHWc set: reordered around, as a custom op


def replace_group_norms(module: nn.Module, make: type[nn.Module]) -> nn.Module:
    """A copy of the module with every GroupNorm replaced by `make()`."""
    m = copy.deepcopy(module)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, make())
    return m


def without_group_norm(module: nn.Module) -> nn.Module:
    return replace_group_norms(module, _NoNorm)


def group_norm_as_one_op(module: nn.Module) -> nn.Module:
    """Every GroupNorm, with the SiLU after it, as one cheap elementwise node: what a fused GroupNorm+SiLU custom
    operator would cost at best (wrong numbers). Export it inside `silu_on_images_skipped()`."""
    return replace_group_norms(module, _OneOp)


@contextlib.contextmanager
def silu_on_images_skipped():
    """F.silu on (B, C, H, W) tensors (those after a GroupNorm) is left out; on the time embedding it stays."""
    real = F.silu
    F.silu = lambda x, inplace=False: x if x.dim() == 4 else real(x, inplace)
    try:
        yield
    finally:
        F.silu = real


def step_vs_forward(w, cache: Path, steps: int = 200) -> dict[str, tuple[float, float]]:
    """ms per batch-1 1000-step ddpm step, (best, median) of interleaved rounds: the engine's step() as the service
    runs it with SPIN_THREADS, and the same runner's U-Net call alone on an input of the same shape."""
    engine = SamplerEngine(w.unet, w.diffusion, cache_dir=cache, spin=True)
    engine.runner.chain_steps = 0  # one runner call per step (bench/chain_in_graph.py times the chained steps)
    cfg = w.unet.config
    x, t = torch.randn(1, cfg.in_channels, cfg.image_size, cfg.image_size), torch.tensor([500.0])

    def engine_steps():
        engine.add("bench", [SampleSpec(seed=0)])
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        dt = time.perf_counter() - t0
        engine.cancel("bench")
        return dt

    def forward_calls():
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.runner(x, t)
        return time.perf_counter() - t0

    fns = {"the engine's step()": engine_steps, "its U-Net call alone": forward_calls}
    times = {name: [] for name in fns}
    with torch.inference_mode():
        for name, f in fns.items():
            f()  # warm up
        for _ in range(ROUNDS):
            for name, f in fns.items():
                times[name].append(f() / steps * 1e3)
    engine.runner.close()
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def call_after_pause(pauses_ms=(0, 1, 5, 20), calls: int = 200) -> dict[float, float]:
    """us per torch.from_numpy on a (1, 3, 32, 32) array, median, right after a busy wait of each length: how much
    a small torch call costs once its code has gone cold (the busy wait runs Python only; no data is touched)."""
    a = np.zeros((1, 3, 32, 32), np.float32)
    out = {}
    for pause in pauses_ms:
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < pause / 1e3:
                pass
            t1 = time.perf_counter()
            torch.from_numpy(a)
            samples.append((time.perf_counter() - t1) * 1e6)
        out[pause] = statistics.median(samples)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--out", default=None)
    p.add_argument("--ort-include", default=None, help="ONNX Runtime's C/C++ API headers: adds a row with the fused "
                   "GroupNorm+SiLU custom operator (bench/fused_group_norm.py says where to get them)")
    a = p.parse_args(argv)
    import onnxruntime

    w = load_weights(a.weights)
    cfg = w.unet.config
    x = np.random.default_rng(0).standard_normal((1, cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)
    feeds = {"x": x, "t": np.array([500.0], np.float32)}
    torch.set_num_threads(1)
    peak1, _ = matmul_peak_flops(torch.device("cpu"), torch.float32)
    torch.set_num_threads(2)
    peak2, _ = matmul_peak_flops(torch.device("cpu"), torch.float32)
    with tempfile.TemporaryDirectory() as d:
        full, floor, fused = (Path(d) / f"{n}.onnx" for n in ("unet", "no-groupnorm", "one-op-groupnorm"))
        export(w.unet, full)
        export(without_group_norm(w.unet), floor)
        with silu_on_images_skipped():
            export(group_norm_as_one_op(w.unet), fused)
        graphs = dict(zip(GRAPHS, ((full, None), (floor, None), (fused, None))))
        if a.ort_include:  # the real fused operator: numbers as the module's, so checked like the runner's graph
            import onnx
            from fused_group_norm import build, fuse  # bench/fused_group_norm.py

            library, custom = build(a.ort_include, d), Path(d) / "custom-op.onnx"
            model = onnx.load(str(full))
            count = fuse(model)
            onnx.save(model, str(custom))
            graphs[FUSED_OP.format(count)] = (custom, library)
        fns, floors = {}, set()
        for label, (path, library) in graphs.items():
            for threads, spin in OPTIONS:
                fns[label, threads, spin] = as_fn(session(path, threads, spin, library=library))
                if path in (floor, fused):
                    floors.add((label, threads, spin))
        # interleaved rounds, the real graph checked against the module (the floor differs on purpose)
        [(_, timing)] = time_interleaved(fns, w.unet, [1], ROUNDS, 0.3, unchecked=frozenset(floors))
        prof = {threads: profile(full, feeds, threads) for threads in (1, 2)}
        step = step_vs_forward(w, Path(d))
    pauses = call_after_pause()

    lines = ["# Where the batch-1 CPU forward goes (ONNX Runtime)", "",
             f"{stamp()}, "
             f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}",
             f"- weights: {Path(a.weights).name} ({cfg.image_size}px, base {cfg.base_channels})",
             f"- command: `{command(__file__, argv)}`",
             f"- matmul peak (best of 512/1024/2048 square fp32 x 5): {peak1 / 1e9:.0f} GFLOP/s on 1 thread, "
             f"{peak2 / 1e9:.0f} on 2", "",
             f"ms per batch-1 forward, best (median) of {ROUNDS} interleaved rounds of ~0.3 s:", "",
             "| graph | 1 thread | 2 threads | 2 threads, spinning |", "| --- | --- | --- | --- |"]
    for label in graphs:
        lines.append(f"| {label} | " + " | ".join("%.2f (%.2f)" % timing[label, t, s] for t, s in OPTIONS) + " |")
    lines += ["", "ORT's profile of the runner's graph (the profiler adds its own cost to every op, so compare shares, "
              "not totals):", "", "| op type | 1 thread, us per run | 2 threads spinning, us per run |",
              "| --- | --- | --- |"]
    ops1, ops2 = prof[1][0], prof[2][0]
    for op in sorted(ops1, key=ops1.get, reverse=True)[:12]:
        lines.append(f"| {op} | {ops1[op]:.0f} | {ops2.get(op, 0):.0f} |")
    lines.append("")
    for threads, peak in ((1, peak1), (2, peak2)):
        _, us, flops = prof[threads]
        rate = flops / us / 1e3
        lines.append(f"- convolutions on {threads} thread(s): {us / 1e3:.2f} ms per forward for {flops / 1e9:.3f} "
                     f"GFLOP = {rate:.0f} GFLOP/s, {100 * rate * 1e9 / peak:.0f}% of the {threads}-thread matmul peak")
    (eb, em), (fb, fm) = step["the engine's step()"], step["its U-Net call alone"]
    lines += ["", "The whole step, batch 1, 1000-step ddpm, as the service runs it with SPIN_THREADS (ms per step, "
              f"best (median) of {ROUNDS} interleaved rounds of 200 steps):", "",
              "| the engine's step() | its U-Net call alone | the rest of the step |", "| --- | --- | --- |",
              f"| {eb:.2f} ({em:.2f}) | {fb:.2f} ({fm:.2f}) | {eb - fb:.2f} ({em - fm:.2f}) |", "",
              "Why the rest costs more than its arithmetic: a small torch call (`torch.from_numpy` of one image), "
              "median us, right after a busy wait of Python only:", "",
              "| " + " | ".join(f"after {p} ms" for p in pauses) + " |",
              "| " + " | ".join("---" for _ in pauses) + " |",
              "| " + " | ".join(f"{v:.1f}" for v in pauses.values()) + " |"]
    emit(lines, a.out)


if __name__ == "__main__":
    main()
