"""Offline sampling: `python -m model.sample --weights W.safetensors --n 16 --seed 7 --out DIR`.

Writes DIR/<seed>.png for each image (seed, seed+1, ...) and DIR/grid.png, with a progress bar over
denoising steps. Each PNG carries its seed, sampler, steps and the weights' sha256 as text chunks.
`--npz FILE` also packs all images into one uint8 array (key 'images', NxHxWx3), the form `python -m
train.evaluate --images` reads (e.g. images made on a GPU, scored on another machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tqdm import tqdm

from .diffusion import SAMPLERS
from .device import pick_device, pick_dtype
from .engine import SamplerEngine, generate
from .images import grid, png_bytes, provenance
from .noise import image_seeds
from .weights import WeightsError, default_weights, load_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="safetensors weights (default: the shipped weights for the "
                   "device, weights/celeba-h200-64.safetensors on CUDA, weights/celeba32-cpu.safetensors on CPU)")
    p.add_argument("--n", type=int, default=16, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--npz", default=None, help="also write all images to this .npz (key 'images', uint8)")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be at least 1")
    try:
        seeds = image_seeds(a.seed, a.n)
    except ValueError as e:
        p.error(str(e))
    try:
        device = pick_device(a.device)
        dtype = pick_dtype(a.dtype, device)
        w = load_weights(a.weights or default_weights(device), device)
        steps_ok = 1 <= a.steps <= w.diffusion.T
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not steps_ok:
        p.error(f"--steps must be in [1, {w.diffusion.T}]")
    engine = SamplerEngine(w.unet, w.diffusion, device, dtype)
    with tqdm(total=a.n * a.steps, unit="img-step", desc=f"{a.sampler} x{a.steps}") as bar:
        images = generate(engine, seeds, a.sampler, a.steps, a.batch_size, progress=bar)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed, img in zip(seeds, images):
        (out / f"{seed}.png").write_bytes(png_bytes(img, provenance(seed, a.sampler, a.steps, w.sha256, w.name)))
    (out / "grid.png").write_bytes(png_bytes(grid(images), {"seeds": f"{seeds[0]}-{seeds[-1]}",
                                                            "sampler": a.sampler, "steps": str(a.steps),
                                                            "weights_sha256": w.sha256, "model": w.name}))
    if a.npz:
        Path(a.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(a.npz, images=images, seeds=np.array(seeds, dtype=np.int64))
    print(f"wrote {len(images)} images and grid.png to {out}" + (f", and {a.npz}" if a.npz else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
