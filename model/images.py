"""PNG encoding with provenance text chunks, and sample grids."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, PngImagePlugin


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
