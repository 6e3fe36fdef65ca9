"""Which preset to train in a fixed time: `python -m train.pick_preset --budget 300 --min-steps 6000`.

Times a few training steps of each candidate on this device (`python -m train`'s optimizer_step: bf16
autocast on CUDA, fused AdamW, EMA, gradient clipping, on random images) and picks the largest candidate that can make
`--min-steps` optimizer steps at `--batch-size` within `--budget` seconds; if none can, the fastest. In a short
budget a smaller model that sees the data many times beats a large one that sees it once. Prints a table on
stderr and the chosen preset's name alone on stdout, for scripts: `P=$(python -m train.pick_preset ...)`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from model.device import pick_device
from model.diffusion import Diffusion, ScheduleConfig
from model.unet import PRESETS, UNet, count_parameters

from .train import autocast, optimizer_step, training_memory_format

DEFAULT_CANDIDATES = ["celeba64-9m", "celeba64-5m", "celeba64-2m"]


def steps_per_second(preset: str, batch: int, device: torch.device, seconds: float, warmup: int = 3) -> float:
    """Optimizer steps per second of the training loop for `preset`, timed for about `seconds` after warm-up."""
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    memory_format = training_memory_format("auto", device, "auto")
    model = UNet(cfg).to(device).to(memory_format=memory_format).train()
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    diffusion = Diffusion(ScheduleConfig(prediction="v"))
    amp = autocast(device)
    x0 = (torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1).contiguous(
        memory_format=memory_format)

    def step(i: int) -> None:
        t = torch.randint(0, diffusion.T, (batch,), device=device)
        optimizer_step(model, model, ema, opt, diffusion, x0, t, torch.randn_like(x0), amp, 1.0, i, 0.9999)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(warmup):
        step(i)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        step(n)
        n += 1
        if n % 5 == 0:
            sync()
            if time.perf_counter() - t0 >= seconds:
                return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.pick_preset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES, choices=sorted(PRESETS))
    p.add_argument("--budget", type=float, required=True, help="seconds of training to plan for")
    p.add_argument("--min-steps", type=int, required=True, help="optimizer steps the budget must allow")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=5.0, help="timing per candidate, after warm-up")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    try:
        device = pick_device(a.device)
    except ValueError as e:
        p.error(str(e))
    rows = []
    for name in a.candidates:
        rate = steps_per_second(name, a.batch_size, device, a.seconds)
        params = count_parameters(UNet(PRESETS[name]))
        rows.append((params, name, rate, rate * a.budget))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fits = [r for r in rows if r[3] >= a.min_steps]
    chosen = max(fits)[1] if fits else max(rows, key=lambda r: r[2])[1]
    print(f"batch {a.batch_size} on {device}; a preset fits when {a.budget:.0f} s x steps/s >= {a.min_steps} steps",
          file=sys.stderr)
    print("| preset | parameters | steps/s | images/s | steps in budget | fits |", file=sys.stderr)
    print("| --- | --- | --- | --- | --- | --- |", file=sys.stderr)
    for params, name, rate, steps in sorted(rows, reverse=True):
        mark = "chosen" if name == chosen else ("yes" if steps >= a.min_steps else "no")
        print(f"| {name} | {params / 1e6:.2f}M | {rate:.2f} | {rate * a.batch_size:.0f} | {steps:.0f} | {mark} |",
              file=sys.stderr)
    print(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
