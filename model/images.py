"""PNG encoding with provenance text chunks, sample grids, and framing a face photo the way the training data is."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, PngImagePlugin

CELEBA_W, CELEBA_H = 178, 218
CELEBA_BOX = (89.0, 121.0, 128.0)  # centre x, centre y, side, on the 178x218 image (DDIM's CelebA-64 framing)


def png_bytes(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Encode an HxWxC uint8 image as PNG with tEXt chunks (e.g. seed, sampler, steps, weights_sha256)."""
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, str(v))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile N HxWxC images into one image, ncols per row (default: a near-square grid), with white padding."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return out


def provenance(seed: int, sampler: str, steps: int, sha256: str, model: str) -> dict[str, str]:
    return {"seed": str(seed), "sampler": sampler, "steps": str(steps), "weights_sha256": sha256, "model": model}


def auto_framing(w: int, h: int) -> str:
    """'celeba' for a photo of CelebA's aligned shape (178x218 or a scale of it), else 'center'."""
    return "celeba" if abs(w / h - CELEBA_W / CELEBA_H) < 0.02 else "center"


def frame_box(w: int, h: int, framing: str) -> tuple[float, float, float, float]:
    if framing == "auto":
        framing = auto_framing(w, h)
    if framing == "celeba":
        s = w / CELEBA_W
        cx, cy, side = (v * s for v in CELEBA_BOX)
        return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    if framing == "center":
        side = min(w, h)
        return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2
    raise ValueError(f"unknown framing {framing!r} (expected auto, celeba or center)")


def frame(img: Image.Image, size: int, framing: str = "auto") -> np.ndarray:
    """Crop the face box and resize to size x size (antialiased); when the box is already size x size, crop
    whole pixels only (the half-size CelebA box falls between pixels: no resampling blur for 64x64 models)."""
    img = img.convert("RGB")
    box = frame_box(img.width, img.height, framing)
    if abs((box[2] - box[0]) - size) < 1e-6:
        left, top = int(box[0]), int(box[1])
        img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(img, dtype=np.uint8)
