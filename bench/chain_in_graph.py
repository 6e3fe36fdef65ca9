"""What the step loop around the U-Net costs, and what chaining steps in one call saves: a batch-1 (or `--batch`)
`ddpm` chain run several ways, interleaved, all on ONNX Runtime with the same threads and spinning:

- the engine with one runner call per step (the U-Net; the update, noise and bookkeeping in torch between calls);
- the engine as it runs by default: CHAIN_STEPS steps per call, the U-Net copied that many times into one graph
  with the update after each copy (model/onnx_chain.py), no Python between those forwards; or `--chain` K steps per
  call (what chose CHAIN_STEPS);
- the chain as an ONNX `Loop` (the same step as the loop's body), `--loop` steps per call: the alternative to
  copies, kept here because it measured slower than copies.

Every way gives the same image (checked every round, within 1/255), so the differences are the loop's cost. Measured
for issue 21 (`{"n": 1}` in 3 s on 2 cores).

    python bench/chain_in_graph.py --rounds 5 --out bench/results/chain-in-graph-cpu.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.engine import SampleSpec, SamplerEngine, generate, to_uint8  # noqa: E402
from model.noise import gaussian  # noqa: E402
from model.onnx_chain import image_input, step_nodes  # noqa: E402
from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from report import command, emit, stamp  # noqa: E402


def loop_graph(unet_path: Path, shape: tuple[int, int, int]):
    """The chain as an ONNX Loop over model/onnx_chain.py's step: inputs x_in (B, C, H, W), coef (K, B, 4) and
    z (K, B, C, H, W) as for the unrolled chain, K any length; output x_out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    unet = onnx.load(str(unet_path))
    body = helper.make_graph(
        [*step_nodes(unet, "i", "x_loop", "x_next"), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "step", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), image_input("x_loop", shape)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), image_input("x_next", shape)])
    graph = helper.make_graph(
        [helper.make_node("Shape", ["coef"], ["coef_shape"]),
         helper.make_node("Gather", ["coef_shape", "zero"], ["steps"], axis=0),
         helper.make_node("Loop", ["steps", "true", "x_in"], ["x_out"], body=body)],
        "chain_loop",
        [image_input("x_in", shape), helper.make_tensor_value_info("coef", TensorProto.FLOAT, ["K", "batch", 4]),
         image_input("z", shape, ("K",))],
        [image_input("x_out", shape)],
        initializer=[*unet.graph.initializer, numpy_helper.from_array(np.array(0, np.int64), "zero"),
                     numpy_helper.from_array(np.array(True), "true")])
    model = helper.make_model(graph, opset_imports=unet.opset_import)
    model.ir_version = unet.ir_version
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--steps", type=int, default=1000, help="ddpm steps of the chain (default 1000)")
    p.add_argument("--batch", type=int, default=1, help="rows sampled at once (seeds --seed, --seed+1, ...)")
    p.add_argument("--chain", type=int, nargs="+", default=None,
                   help="steps per call of the engine's chained runs, one column each (default: the runner's)")
    p.add_argument("--loop", type=int, nargs="*", default=[50],
                   help="steps per call of the ONNX Loop graph, one column each (default 50; none: no Loop column)")
    p.add_argument("--no-spin", action="store_true", help="ORT threads do not spin (the service's default)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each way")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import onnxruntime as ort

    w = load_weights(a.weights)
    engine = SamplerEngine(w.unet, w.diffusion, runner="onnx", spin=not a.no_spin)
    runner = engine.runner
    if runner.mode != "onnx":
        sys.exit(f"the runner fell back to {runner.mode}: this compares ONNX Runtime graphs")
    default_chain = runner.chain_steps
    seeds = list(range(a.seed, a.seed + a.batch))
    shape = engine.shape

    def in_engine(chain_steps: int):
        runner.chain_steps = chain_steps
        t0 = time.perf_counter()
        images = generate(engine, seeds, "ddpm", a.steps, batch_size=a.batch)
        return time.perf_counter() - t0, images

    ways = {"the engine, one call per step": lambda: in_engine(0)}
    for k in a.chain or [default_chain]:
        name = f"the engine, {k} steps per call" + (" (default)" if k == default_chain else "")
        ways[name] = lambda k=k: in_engine(k)
    if a.loop:
        if a.batch != 1:
            sys.exit("the Loop columns are for batch 1 (run with --loop and nothing after it)")
        spec = SampleSpec(a.seed, "ddpm", a.steps)
        table = w.diffusion.coefficients(spec.sampler, spec.steps, spec.t_max, tuple(spec.jumps)).numpy()
        coef = np.ascontiguousarray(table[:, :4], dtype=np.float32)[:, None]  # (steps, 1, 4): t, a, b, c
        seed = torch.tensor([a.seed])
        x_T = gaussian(seed, torch.zeros(1, dtype=torch.int64), shape).numpy()  # noise index 0, as engine.add
        z = gaussian(seed.repeat(a.steps), torch.arange(1, a.steps + 1), shape).numpy()[:, None]  # step k: k+1
        folder = Path(tempfile.mkdtemp(prefix="chain-loop-"))  # not in the runner's cache: a bench artefact
        try:
            import onnx

            onnx.save(loop_graph(runner.fn.path, shape), str(folder / "loop.onnx"))
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = runner.workers if not a.no_spin else 1, 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0" if a.no_spin else "1")
            session = ort.InferenceSession(str(folder / "loop.onnx"), so, providers=["CPUExecutionProvider"])
        finally:
            shutil.rmtree(folder)

        def in_loop(k: int):
            t0 = time.perf_counter()
            x = x_T
            for s in range(0, a.steps, k):
                x = session.run(None, {"x_in": x, "coef": coef[s:s + k], "z": z[s:s + k]})[0]
            dt = time.perf_counter() - t0
            return dt, to_uint8(torch.from_numpy(x)).numpy()

        ways.update({f"ONNX Loop, {k} steps per call": lambda k=k: in_loop(k) for k in a.loop})

    times = {name: [] for name in ways}
    worst = 0
    for r in range(a.rounds + 1):  # round 0 warms up (sessions, caches) and is not timed
        images = []
        for name, fn in ways.items():
            dt, img = fn()
            if r:
                times[name].append(dt)
            images.append(img.astype(np.int16))
        worst = max(worst, *(int(np.abs(images[0] - img).max()) for img in images[1:]))
        if worst > 1:
            sys.exit(f"the ways gave different images (a pixel differs by {worst}/255)")

    first = next(iter(ways))
    best = {name: min(v) for name, v in times.items()}
    lines = [
        f"# The batch-{a.batch} `ddpm` chain: one call per step vs several steps per call", "",
        f"{stamp()}, torch {torch.__version__}, onnxruntime {ort.__version__}",
        f"- weights: {Path(a.weights).name}; {a.steps}-step ddpm, seeds {seeds[0]}..{seeds[-1]}; ORT threads "
        + ("not spinning (the service's default)" if a.no_spin else "spinning (SPIN_THREADS)"),
        f"- command: `{command(__file__, argv)}`",
        f"- images: the same every way in every round (largest pixel difference {worst}/255)", "",
        f"seconds for the chain, best (median) of {a.rounds} interleaved runs, and the first column's best over "
        "each:", "",
        "| batch | " + " | ".join(ways) + " |",
        "| --- |" + " --- |" * len(ways),
        f"| {a.batch} | " + " | ".join(f"{best[n]:.3f} ({statistics.median(times[n]):.3f})"
                                     + ("" if n == first else f", {best[first] / best[n]:.2f}x") for n in ways)
        + " |",
    ]
    emit(lines, a.out, append=True)


if __name__ == "__main__":
    main()
