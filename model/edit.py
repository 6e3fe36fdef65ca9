"""Editing real faces with the unconditional model, offline: image-to-image, inpainting and interpolation.

    python -m model.edit --image face.jpg --strength 0.5 --seed 7 --out DIR                # SDEdit
    python -m model.edit --image face.jpg --mask mask.png --seed 7 --out DIR               # RePaint
    python -m model.edit --interpolate 3 11 --frames 8 --out DIR                           # slerp of x_T, DDIM

SDEdit (Meng et al. 2021): the face is noised to t = strength * T with q_sample and denoised from there; low
strength keeps the face, 1 makes a new one. RePaint (Lugmayr et al. 2022): after every reverse step the known
pixels (mask black) are replaced by the original noised to the step's level; the white ones are drawn; with
--jump-length L --jump-n-sample N, every L-th step goes back up L steps and down again, N - 1 times (RePaint's
resampling, which harmonises the drawn region with the known one at N times the cost). Interpolation (Song et al.
2021, DDIM): x_T of frame j is the spherical interpolation of the two seeds' x_T, sampled with deterministic DDIM so
the path is smooth.

Photos are framed like the training data (the CelebA box for 178x218 photos, a centre square otherwise) and
resized to the model's resolution; a mask must have the photo's size and is framed the same way. Each row runs on
the same engine as plain sampling (model/engine.py), so edits and plain samples can share a batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .device import pick_device, pick_dtype
from .diffusion import SAMPLERS, STOCHASTIC
from .engine import Edit, SampleSpec, SamplerEngine, run
from .images import frame, grid, png_bytes
from .noise import gaussian, image_seeds, slerp
from .weights import WeightsError, default_weights, load_weights

MAX_PIXELS = 4096 * 4096  # larger images are refused from their header, before decoding (decompression bombs)


class EditError(ValueError):
    """An input that cannot be edited; the message names the file and the problem."""


def to_model(u8: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float in [-1, 1]."""
    return torch.from_numpy(np.array(u8, copy=True)).permute(2, 0, 1).float() / 127.5 - 1


def _check_size(img: Image.Image, path) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise EditError(f"{path}: {img.width}x{img.height} is over the {MAX_PIXELS} pixels accepted")


def load_photo(path: str | Path, size: int) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            _check_size(img, path)
            return to_model(frame(img, size))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise EditError(f"{path}: cannot read the image ({e})") from e


def mask_to_keep(mask: Image.Image, size: int) -> torch.Tensor:
    """1xSxS bool, True where the photo's pixels are kept: the mask framed like the photo, black (< 128) = keep,
    white = repaint."""
    return torch.from_numpy(frame(mask.convert("L").convert("RGB"), size)[..., 0] < 128)[None]


def load_mask(path: str | Path, photo: str | Path, size: int) -> torch.Tensor:
    """1xHxW bool, True where the photo's pixels are kept (the mask is black there; white = repaint)."""
    try:
        with Image.open(path) as m, Image.open(photo) as p:
            _check_size(m, path)
            if m.size != p.size:
                raise EditError(f"{path}: the mask is {m.size[0]}x{m.size[1]}, the image {p.size[0]}x{p.size[1]}")
            keep = mask_to_keep(m, size)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise EditError(f"{path}: cannot read the mask ({e})") from e
    if keep.all():
        raise EditError(f"{path}: the mask marks nothing to repaint (white = repaint)")
    return keep


def interpolation_starts(seed_a: int, seed_b: int, frames: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """x_T of each frame: slerp between the two seeds' x_T (noise index 0, as plain sampling draws it)."""
    ends = gaussian(torch.tensor([seed_a, seed_b]), torch.zeros(2, dtype=torch.int64), shape)
    return [slerp(ends[0], ends[1], j / (frames - 1)) for j in range(frames)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.edit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="safetensors weights (default: the shipped ones for the device)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="the face photo to edit (JPEG, PNG, ...)")
    what.add_argument("--interpolate", nargs=2, type=int, metavar=("SEED_A", "SEED_B"))
    p.add_argument("--mask", help="inpainting: white = repaint, black = keep; the image's size")
    p.add_argument("--strength", type=float, default=None,
                   help="image-to-image: 0 < s <= 1 (default 0.5; with --mask: 1, from pure noise)")
    p.add_argument("--jump-length", type=int, default=1, help="inpainting: RePaint's resampling jump (1: none)")
    p.add_argument("--jump-n-sample", type=int, default=1, help="inpainting: RePaint's resamplings per jump")
    p.add_argument("--frames", type=int, default=8, help="interpolation frames, 2..16")
    p.add_argument("--n", type=int, default=1, help="edits of the image, seeds seed..seed+n-1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help="default: ddpm for edits (RePaint needs a stochastic sampler), ddim for interpolation")
    p.add_argument("--steps", type=int, default=None, help="default: the whole chain (1000 for ddpm, 50 for ddim)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args(argv)
    if a.interpolate and not 2 <= a.frames <= 16:
        p.error("--frames must be in 2..16")
    if a.mask and not a.image:
        p.error("--mask needs --image")
    if not 1 <= a.n <= 64:
        p.error("--n must be in 1..64")
    try:
        device = pick_device(a.device)
        w = load_weights(a.weights or default_weights(device), device)
        size = w.unet.config.image_size
        sampler = a.sampler or ("ddim" if a.interpolate else "ddpm")
        strength = a.strength if a.strength is not None else (1.0 if a.mask else 0.5)
        t_max = None if a.interpolate else w.diffusion.t_max_for_strength(strength)
        top = w.diffusion.T - 1 if t_max is None else t_max
        steps = a.steps or (top + 1 if sampler in STOCHASTIC else min(50, top + 1))  # ddpm: every step of the chain
        w.diffusion.timesteps(steps, t_max=t_max)  # validates steps
        if a.interpolate:
            specs = [SampleSpec(a.interpolate[0], sampler, steps) for _ in range(a.frames)]
            edits = [Edit(x_start=x) for x in interpolation_starts(*a.interpolate, a.frames, (3, size, size))]
        else:
            image = load_photo(a.image, size)
            keep = load_mask(a.mask, a.image, size) if a.mask else None
            jumps = (a.jump_length, a.jump_n_sample)
            if jumps != (1, 1) and not a.mask:
                raise EditError("--jump-length/--jump-n-sample are RePaint's: they need --mask")
            specs = [SampleSpec(s, sampler, steps, t_max=t_max, jumps=jumps) for s in image_seeds(a.seed, a.n)]
            w.diffusion.coefficients(sampler, steps, t_max, jumps)  # validates the jumps for the sampler
            edits = [Edit(image=image, keep=keep) for _ in specs]
    except (WeightsError, EditError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = SamplerEngine(w.unet, w.diffusion, device, pick_dtype(a.dtype, device))
    rows = len(w.diffusion.coefficients(sampler, steps, specs[0].t_max, specs[0].jumps))
    with tqdm(total=len(specs) * rows, unit="img-step", desc=f"{sampler} x{rows}") as bar:
        images = run(engine, specs, edits, batch_size=len(specs), progress=bar)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.interpolate:
        for j, img in enumerate(images):
            (out / f"frame_{j:02d}.png").write_bytes(png_bytes(img))
        (out / "strip.png").write_bytes(png_bytes(grid(images, len(images))))
        print(f"wrote {len(images)} frames and strip.png to {out}")
        return 0
    framed = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    (out / "input.png").write_bytes(png_bytes(framed))
    for s, img in zip(specs, images):
        (out / f"{s.seed}.png").write_bytes(png_bytes(img, {"seed": str(s.seed), "sampler": sampler,
                                                             "steps": str(steps), "strength": str(strength),
                                                             "mode": "inpaint" if a.mask else "img2img"}))
    (out / "grid.png").write_bytes(png_bytes(grid(np.concatenate([framed[None], images]))))
    print(f"wrote {len(images)} edits, input.png (the framed input) and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
