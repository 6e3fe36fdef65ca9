"""The training step's speed: images/s of forward, backward, clipping, AdamW and the EMA (train.train's
optimizer_step on random images), by preset, batch size, precision, memory format and torch.compile, against the
machine's best GEMM rate measured in the same run.

    python bench/train_step.py --presets cpu32 --batch 64 128 --variants fp32 fp32-cl bf16-cl compile-bf16-cl \
        --out bench/results/train-step-cpu.md

Variants: fp32 / bf16 (autocast to bfloat16), -cl (channels_last), compile- (torch.compile of the U-Net, inductor).
FLOPs per image are counted by torch's FlopCounterMode over one forward and backward (convolutions, matmuls,
attention), so the share of peak is what the GEMM-shaped work reached.

`--loops` then times the whole training loop (`python -m train` on the CelebA tars: data indexing, flips, noise,
the step, logging) for each named configuration, images/s from its metrics.jsonl after the first log interval:
`before` is the command every CPU model so far was trained with, the others what this benchmark found.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import command, emit, stamp  # noqa: E402
from bench.sampler import matmul_peak_flops  # noqa: E402
from model.diffusion import Diffusion, ScheduleConfig  # noqa: E402
from model.unet import PRESETS, UNet, UNetConfig, count_parameters  # noqa: E402
from train.train import autocast, optimizer_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "celeba"
LOOPS = {  # name: (launcher, train flags)
    "before": ([], ["--batch-size", "64", "--precision", "fp32"]),
    "bf16-128": ([], ["--batch-size", "128", "--precision", "bf16"]),
    "2proc-bf16-128": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                       ["--batch-size", "128", "--precision", "bf16", "--threads", "1"]),
    "2proc-bf16-256": (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                       ["--batch-size", "256", "--precision", "bf16", "--threads", "1"]),
}
VARIANTS = ("fp32", "fp32-cl", "bf16", "bf16-cl", "compile-fp32", "compile-fp32-cl", "compile-bf16", "compile-bf16-cl")


def train_flops_per_image(cfg, diffusion) -> float:
    """FLOPs of one image's forward and backward through the training loss (bench/sampler.py's flops_per_image
    counts a forward alone)."""
    model = UNet(cfg)
    x = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    t = torch.randint(0, diffusion.T, (4,))
    with FlopCounterMode(display=False) as counter:
        diffusion.training_loss(model, x, t, torch.randn_like(x)).backward()
    return counter.get_total_flops() / 4


def time_variant(cfg, diffusion, variant: str, batch: int, steps: int, warmup: int) -> list[float]:
    """Seconds per step of `steps` steps, after `warmup` (compilation happens there)."""
    torch.manual_seed(0)
    channels_last = variant.endswith("-cl")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(cfg).to(memory_format=fmt)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    fwd = torch.compile(model) if variant.startswith("compile") else model
    amp = autocast(torch.device("cpu"), "bf16" if "bf16" in variant else "fp32")
    x0 = (torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1).contiguous(memory_format=fmt)
    t = torch.randint(0, diffusion.T, (batch,))
    eps = torch.randn_like(x0)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = optimizer_step(fwd, model, ema, opt, diffusion, x0, t, eps, amp, 1.0, i, 0.9999)
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_loop(name: str, preset: str, steps: int, workdir: Path) -> float:
    """images/s of `python -m train` in the LOOPS configuration `name`, over the log intervals after the first."""
    launcher, flags = LOOPS[name]
    out = workdir / name
    cmd = [sys.executable, *launcher, "-m", "train",
           "--data", str(DATA / "img_align_celeba_89x109_000001-009000.tar"), "--range", "1-8000",
           "--data", str(DATA / "img_align_celeba_89x109_more_24477.tar"), "--preset", preset, *flags,
           "--steps", str(steps), "--log-every", str(max(1, steps // 4)), "--sample-every", str(10**9),
           "--ckpt-every", str(10**9), "--out", str(out), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"error: {name}: {r.stderr[-2000:]}")
    logs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"images_per_s"' in x]
    return statistics.median(x["images_per_s"] for x in logs[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cpu32"], choices=sorted(PRESETS))
    p.add_argument("--batch", nargs="+", type=int, default=[64])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override preset fields, e.g. base_channels=32 dropout=0 (JSON values)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--loops", nargs="*", default=[], choices=list(LOOPS), help="whole-loop configurations to time")
    p.add_argument("--loop-steps", type=int, default=120, help="steps of each loop run")
    p.add_argument("--out", default=None)
    p.add_argument("--append", action="store_true", help="add this run's section to --out instead of replacing it")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    diffusion = Diffusion(ScheduleConfig(prediction="v"))
    peak, peak_at = matmul_peak_flops(torch.device("cpu"), torch.float32)
    lines = [f"# Training step on {torch.get_num_threads()} threads", "", stamp(),
             f"- command: `{command(__file__, argv)}`",
             f"- torch {torch.__version__}; fp32 GEMM peak {peak / 1e9:.0f} GFLOP/s ({peak_at})", "",
             "| preset | params | GFLOP/image (fwd+bwd) | batch | variant | images/s (median) | best | GFLOP/s | "
             "share of fp32 peak |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in a.presets:
        cfg = UNetConfig.from_dict({**PRESETS[name].to_dict(), **overrides})
        f = train_flops_per_image(cfg, diffusion)
        params = count_parameters(UNet(cfg))
        for batch in a.batch:
            for variant in a.variants:
                times = time_variant(cfg, diffusion, variant, batch, a.steps, a.warmup)
                med, best = statistics.median(times), min(times)
                rate = batch / med
                label = name + (" " + " ".join(a.set) if a.set else "")
                lines.append(f"| {label} | {params / 1e6:.2f}M | {f / 1e9:.3f} | {batch} | {variant} | {rate:.0f} | "
                             f"{batch / best:.0f} | {rate * f / 1e9:.0f} | {rate * f / peak:.0%} |")
                print(lines[-1], flush=True)
    if a.loops:
        lines += ["", f"Whole loop, `python -m train` on the 32,477 CelebA training images ({a.loop_steps} steps, "
                      "median images/s of the log intervals after the first"
                      + ("; the presets as they are: --set does not reach these runs" if a.set else "") + "):", "",
                  "| preset | loop | launcher + flags | images/s | vs before |", "| --- | --- | --- | --- | --- |"]
        with tempfile.TemporaryDirectory() as tmp:
            for name in a.presets:
                rates = {}
                for loop in a.loops:
                    rates[loop] = time_loop(loop, name, a.loop_steps, Path(tmp) / name)
                    launcher, flags = LOOPS[loop]
                    how = " ".join((["torchrun --nproc_per_node 2"] if launcher else []) + flags)
                    ratio = f"{rates[loop] / rates['before']:.2f}x" if "before" in rates else ""
                    lines.append(f"| {name} | {loop} | `{how}` | {rates[loop]:.0f} | {ratio} |")
                    print(lines[-1], flush=True)
    emit(lines, a.out, append=a.append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
