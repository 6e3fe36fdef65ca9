"""Inpainting benchmark: RePaint on our model vs OpenCV's cv2.inpaint (Telea) vs a mean-colour fill, on the same
held-out faces and masks, scored by FID/KID against the original faces.

    python bench/inpaint.py --weights weights/celeba32-cpu.safetensors --n 1000 --steps 250 \
        --out bench/results/inpaint-cpu.md

The mask is the centre square of half the image's side (a quarter of its pixels), the usual "centre" mask of the
inpainting literature. RePaint (model/edit.py, model/engine.py) runs the respaced DDPM chain of --steps steps, seeds
0..n-1, without resampling jumps. Also reports how many known pixels came back within 1/255.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from report import command, emit, stamp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.edit import to_model  # noqa: E402
from model.engine import Edit, SampleSpec, SamplerEngine, run  # noqa: E402
from model.weights import load_weights  # noqa: E402
from train.evaluate import DEFAULT_CACHE, real_features  # noqa: E402
from train.metrics import fid_from_features, inception_features, kid_from_features, load_inception  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "celeba" / "img_align_celeba_89x109_000001-009000.tar"


def centre_mask(size: int) -> np.ndarray:
    """HxW bool, True where the pixels are repainted: the centre square of half the side."""
    hole = np.zeros((size, size), bool)
    a, b = size // 4, size - size // 4
    hole[a:b, a:b] = True
    return hole


def repaint(w, faces: np.ndarray, hole: np.ndarray, steps: int, batch: int) -> np.ndarray:
    keep = torch.from_numpy(~hole)[None]
    specs = [SampleSpec(i, "ddpm", steps) for i in range(len(faces))]
    edits = [Edit(image=to_model(f), keep=keep) for f in faces]
    with tqdm(total=len(faces) * steps, desc=f"RePaint ddpm x{steps}", unit="img-step") as bar:
        return run(SamplerEngine(w.unet, w.diffusion), specs, edits, batch, bar)


def telea(faces: np.ndarray, hole: np.ndarray) -> np.ndarray:
    import cv2

    m = hole.astype(np.uint8) * 255
    return np.stack([cv2.inpaint(f, m, 3, cv2.INPAINT_TELEA) for f in faces])


def mean_fill(faces: np.ndarray, hole: np.ndarray) -> np.ndarray:
    out = faces.copy()
    for f in out:
        f[hole] = f[~hole].mean(0).round().astype(np.uint8)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT / "weights" / "celeba32-cpu.safetensors"))
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--range", dest="range_", default="8001-9000")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    w = load_weights(a.weights)
    size = w.unet.config.image_size
    from train.data import load_images

    faces = load_images(a.data, size, range_=a.range_, min_images=a.n).images[:a.n].permute(0, 2, 3, 1).numpy()
    faces = np.ascontiguousarray(faces)
    hole = centre_mask(size)
    net = load_inception("cpu")
    real, _, _ = real_features(a.data, a.range_, size, a.n, net, "cpu", DEFAULT_CACHE)
    t0 = time.time()
    ours = repaint(w, faces, hole, a.steps, a.batch)
    repaint_s = time.time() - t0
    diff = np.abs(ours.astype(int) - faces.astype(int))[:, ~hole]
    known_ok = float((diff <= 1).mean())
    rows = []
    methods = [(f"RePaint (ours, ddpm x{a.steps})", ours), ("cv2.inpaint Telea, radius 3", telea(faces, hole)),
               ("mean colour of the known pixels", mean_fill(faces, hole))]
    for name, images in methods:
        feats = inception_features(images, net, desc=f"inception ({name.split()[0]})")
        kid, kid_std = kid_from_features(feats, real)
        rows.append((name, fid_from_features(feats, real), kid, kid_std))
        print(json.dumps({"method": name, "fid": rows[-1][1], "kid": kid}), flush=True)
    lines = [
        f"# Inpainting the centre square (half the side) of {a.n} held-out faces ({a.range_}), {size}x{size}", "",
        f"{stamp()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, weights {w.name} ({w.sha256[:12]})",
        f"- command: `{command(__file__)}`",
        f"- RePaint: {repaint_s:.0f} s for {a.n} faces; known pixels back within 1/255: {100 * known_ok:.2f}%",
        "- FID/KID of the completed faces against the original faces (Inception pool features, 299x299)", "",
        "| method | FID | KID |", "| --- | --- | --- |",
    ] + [f"| {name} | {fid:.1f} | {kid:.4f} ± {std:.4f} |" for name, fid, kid, std in rows]
    emit(lines, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
