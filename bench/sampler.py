"""Sampler benchmark: our engine vs diffusers' DDPMPipeline on the same U-Net weights, in one run.

    python bench/sampler.py --weights weights/celeba32-cpu.safetensors --batch 1 4 --steps 1000 \
        --out bench/results/sampler-cpu.md
    # on a GPU: a random-initialised preset, CUDA graphs vs eager, bf16 (then again with --dtype fp32)
    python bench/sampler.py --preset celeba64 --runner auto eager --batch 1 4 16 64 --steps 200 --dtype bf16

Both run the same maths (DDPM, sigma_t = sqrt(beta_t), no clipping: DDPMScheduler with variance_type
"fixed_large", clip_sample False) on the same device and dtype; the U-Net is loaded into diffusers' UNet2DModel
with model/diffusers_compat.py. Prints and writes a table of images/s, the ratio, FLOPs per image (counted with
FlopCounterMode) and the achieved FLOP/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.diffusers_compat import diffusers_scheduler, to_diffusers  # noqa: E402
from model.device import pick_device, pick_dtype  # noqa: E402
from model.diffusion import Diffusion, ScheduleConfig  # noqa: E402
from model.engine import SamplerEngine, generate  # noqa: E402
from model.unet import PRESETS, UNet  # noqa: E402
from model.weights import LoadedWeights, load_weights  # noqa: E402
from report import command, emit, stamp  # noqa: E402


def random_weights(preset: str) -> LoadedWeights:
    """A random-initialised preset with the default schedule: the speed of a model without training it."""
    torch.manual_seed(0)
    return LoadedWeights(UNet(PRESETS[preset]), Diffusion(ScheduleConfig()), {"name": f"{preset} (random init)"},
                         "", "")


def flops_per_image(unet, size: int, device, dtype) -> float:
    x = torch.randn(1, 3, size, size, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500.0], device=device))
    return float(fc.get_total_flops())


def peak_sizes(device) -> tuple[int, ...]:
    return (2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048)


def _gemms(device, dtype, n: int) -> dict:
    """Square n x n matmuls, each as a zero-argument call, by library, on torch's thread count. On the CPU in fp32,
    beside torch's (MKL, which on an AMD host runs AVX2 code: 210 GFLOP/s where ONNX Runtime did 459 on an AVX-512
    Zen 5 host), ONNX Runtime's (MLAS, whose kernels the runner's convolutions use): the peak is the best of them."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    calls = {"torch": lambda: a @ b}
    if device.type != "cpu" or dtype != torch.float32:
        return calls
    an, bn = a.numpy(), b.numpy()
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return calls
    io = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", io[:2], io[2:])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    calls["onnxruntime"] = lambda: session.run(None, {"a": an, "b": bn})
    return calls


def matmul_peak_flops(device, dtype, sizes=None, repeats: int = 5) -> tuple[float, str]:
    """The device's practical peak: the best FLOP/s of square matmuls over several sizes and libraries (_gemms),
    each timed `repeats` times over ~0.15 s (what the U-Net's convs could reach at most), and where it was reached
    ("2048x2048, onnxruntime")."""
    best, at = 0.0, ""
    for n in sizes or peak_sizes(device):
        for name, matmul in _gemms(device, dtype, n).items():
            matmul()
            reps = max(3, int((1e14 if device.type == "cuda" else 4e8) / (2 * n**3)))  # ~0.15 s per timing
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    matmul()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                flops = 2 * n**3 * reps / (time.perf_counter() - t0)
                if flops > best:
                    best, at = flops, f"{n}x{n}, {name}"
    return best, at


def time_ours(w, device, dtype, batch: int, steps: int, runner: str = "auto") -> tuple[float, str]:
    """Seconds for `steps` steps of a batch, and the runner mode that ran the U-Net. runner: a mode of
    model/runner.py, with "+spin" for its spinning threads (SPIN_THREADS in the service)."""
    mode, _, spin = runner.partition("+")
    engine = SamplerEngine(w.unet, w.diffusion, device, dtype, runner=mode, spin=spin == "spin")
    generate(engine, list(range(batch)), "ddpm", 3, batch)  # warm-up (and on CUDA, the graph capture)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    generate(engine, list(range(batch)), "ddpm", steps, batch)  # ends with the images on the host: synced
    mode = engine.runner.mode + ("+spin" if engine.runner.spin else "")
    if getattr(engine.runner.fn, "eager_reason", None):
        mode += f" (fell back to eager: {engine.runner.fn.eager_reason})"
    engine.runner.close()
    return time.perf_counter() - t0, mode


def time_diffusers(w, device, dtype, batch: int, steps: int) -> float:
    from diffusers import DDPMPipeline

    sched = diffusers_scheduler(w.diffusion.config)
    # DDPMPipeline keeps the image in the U-Net's dtype and cannot hand back bf16 as numpy: a bf16 run is an fp32
    # pipeline under autocast (the U-Net's matmuls and convs in bf16), as diffusers users run it
    half = dtype != torch.float32
    unet = to_diffusers(w.unet, w.diffusion.config).to(device, torch.float32 if half else dtype)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device=device).manual_seed(0)  # noise drawn where the pipeline runs: its fastest
    with torch.autocast(device.type, dtype=dtype, enabled=half):
        pipe(batch_size=batch, num_inference_steps=3, generator=g, output_type="np")  # warm-up
        t0 = time.perf_counter()
        pipe(batch_size=batch, num_inference_steps=steps, generator=g, output_type="np")
        return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/celeba32-cpu.safetensors")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="time a random-initialised preset instead of --weights")
    p.add_argument("--runner", nargs="+", default=["auto"],
                   help="our runner modes to time (model/runner.py); MODE+spin: with spinning threads")
    p.add_argument("--repeat", type=int, default=1, help="time each side this many times, interleaved; the best "
                   "counts (noisy machines)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, nargs="+", default=[1000],
                   help="ddpm steps per batch size (one value for all, or one per --batch); images/s is reported "
                        "per 1000 steps either way, since every step costs the same")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default=None, help="markdown file for the results")
    p.add_argument("--side", choices=["both", "diffusers"], default="both", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    device = pick_device(a.device)
    dtype = pick_dtype(a.dtype, device)
    w = random_weights(a.preset) if a.preset else load_weights(a.weights)
    if len(a.steps) not in (1, len(a.batch)):
        p.error("--steps takes one value or one per --batch value")
    steps = a.steps * len(a.batch) if len(a.steps) == 1 else a.steps
    if a.side == "diffusers":  # the child process of a CPU run (below): one timing, printed
        print(time_diffusers(w, device, dtype, a.batch[0], steps[0]))
        return 0
    flops = flops_per_image(w.unet.to(device, dtype), w.unet.config.image_size, device, dtype)
    peak, peak_at = matmul_peak_flops(device, dtype)
    rows, modes = [], []
    def diffusers_seconds(b: int, n: int) -> float:
        if device.type != "cpu":
            return time_diffusers(w, device, dtype, b, n)
        # OpenMP reads its policy once per process: diffusers runs in a child with libgomp's default (its best
        # alone on the cores), ours here under the service's PASSIVE.
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        source = ["--preset", a.preset] if a.preset else ["--weights", a.weights]
        r = subprocess.run([sys.executable, __file__, "--side", "diffusers", *source, "--batch",
                            str(b), "--steps", str(n), "--device", a.device, "--dtype", a.dtype],
                           env=env, capture_output=True, text=True, check=True, timeout=3600)
        return float(r.stdout.split()[-1])

    for b, n in zip(a.batch, steps):
        timings: dict[str, list[float]] = {}
        beside: dict[str, list[float]] = {}  # per repeat: our FLOP/s over the matmul peak timed just before it
        for _ in range(a.repeat):  # interleaved, so a slow spell of the machine hits both sides
            timings.setdefault("diffusers", []).append(diffusers_seconds(b, n))
            for runner in a.runner:
                near, _ = matmul_peak_flops(device, dtype, repeats=2)  # this VM's speed moves within minutes
                ours, mode = time_ours(w, device, dtype, b, n, runner)
                timings.setdefault(mode, []).append(ours)
                beside.setdefault(mode, []).append(flops * n * b / ours / near)
        theirs = min(timings.pop("diffusers"))
        for mode, runs in timings.items():
            ours = min(runs)
            modes.append(mode)
            ips_o, ips_d = b / ours * n / 1000, b / theirs * n / 1000  # images/s of the 1000-step chain
            achieved = flops * n * b / ours
            rows.append(f"| {b} | {n} | {mode.split()[0]} | {ours:.2f} | {ips_o:.3f} | {theirs:.2f} | {ips_d:.3f} | "
                        f"{ips_o / ips_d:.2f}x | {achieved / 1e9:.1f} | {100 * achieved / peak:.0f}% | "
                        f"{' / '.join(f'{100 * f:.0f}%' for f in beside[mode])} |")
            print(rows[-1], flush=True)
    header = [
        f"# Sampler: ours vs diffusers DDPMPipeline ({w.name}, ddpm)", "",
        f"{stamp()}, {torch.get_num_threads()} threads, device {device}, dtype {str(dtype).split('.')[-1]}, torch "
        f"{torch.__version__}",
        f"- command: `{command(__file__, argv)}`",
        f"- U-Net FLOPs per image per step: {flops / 1e9:.3f} GFLOP (FlopCounterMode); device peak measured as the "
        f"best square matmul of {', '.join(map(str, peak_sizes(device)))} x 5 repeats in "
        f"{', '.join(_gemms(device, dtype, 8))}: {peak / 1e9:.1f} GFLOP/s (at {peak_at})",
        f"- each side timed {a.repeat} time(s), interleaved; the best counts. \"of peak\": the best run's FLOP/s over "
        "the peak above; the last column divides each run's FLOP/s by a matmul peak timed just before it (best of "
        "the three sizes and libraries x 2), since this VM's speed moves within minutes",
        f"- OMP_WAIT_POLICY: ours {os.environ.get('OMP_WAIT_POLICY', 'unset (libgomp default)')}, diffusers "
        "unset (libgomp default, in its own process); our runner modes (model/runner.py): "
        f"{', '.join(sorted(set(modes)))}",
        "- img/s: images per second of the full 1000-step chain (rows with fewer steps are scaled: every step costs "
        "the same); the physical limit at that peak would be "
        f"{peak / (flops * 1000):.3f} img/s", "",
        "| batch | steps run | our runner | ours s | ours img/s | diffusers s | diffusers img/s | ratio | ours GFLOP/s "
        "| of peak | of the peak timed just before, each repeat |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    emit(header + rows, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
