"""Evaluate weights: `python -m train.evaluate --weights W --data PATH --n 1000 --out metrics.json`.

Generates n images (seeds 0..n-1) and compares them with n real images of the same framing and size:
FID and KID (mean and std over 100 subsets of n/2) on Inception-v3 pool features (both sets resized to 299x299),
improved precision and recall (k = 3) on the same features, and the share of images in which OpenCV's Haar
frontal-face cascade finds a face, for generated and real images alike. With --train-data (the model's training
images, repeatable, each with its --train-range), also the real-vs-real floor (n training images drawn with seed
0 against the same real images: what FID, KID, precision and recall read for real faces at this n) and the copy
check: the share of generated images whose nearest training image is under a third of the distance to the second
nearest, next to that share for the real images. Inception features are cached per data, range, size and n.
Prints one JSON line and writes it to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.diffusion import SAMPLERS
from model.device import pick_device, pick_dtype
from model.engine import SamplerEngine, generate
from model.images import grid, png_bytes
from model.weights import WeightsError, load_weights

from .data import DataError, Source, add_source_arguments, load_images, load_sources
from .metrics import (MissingDependency, copy_share, face_share, fid_from_features, inception_features,
                      kid_from_features, load_inception, precision_recall)

DEFAULT_CACHE = Path.home() / ".cache" / "celeba-ddpm" / "fid"


def real_features(data: str, range_: str | None, size: int, n: int, net, device, cache_dir: Path):
    key = hashlib.sha256(json.dumps([str(Path(data).resolve()), range_, size, n]).encode()).hexdigest()[:16]
    path = cache_dir / f"real-{size}-{n}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["features"], float(z["face_share"]), True
    real = real_images(data, range_, size, n)
    feats = inception_features(real, net, device, desc="inception (real)")
    share = face_share(real)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=feats, face_share=share)
    tmp.replace(path)
    return feats, share, False


def real_images(data: str, range_: str | None, size: int, n: int) -> np.ndarray:
    """The first n images of data (in range), (n, size, size, 3) uint8."""
    return load_images(data, size, range_=range_, min_images=n, progress=False).images[:n].permute(0, 2, 3, 1).numpy()


def training_reference(sources: list[Source], size: int, n: int, net, device, cache_dir: Path):
    """(all training images as (N, size, size, 3) uint8, Inception features of n of them drawn with seed 0)."""
    train = load_sources(sources, size).images.permute(0, 2, 3, 1).numpy()
    if len(train) < n:
        raise DataError(f"{' + '.join(map(str, sources))}: {len(train)} training images, at least {n} needed")
    key = hashlib.sha256(json.dumps([[str(Path(s.path).resolve()), s.range_] for s in sources] + [size, n])
                         .encode()).hexdigest()[:16]
    path = cache_dir / f"train-{size}-{n}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return train, z["features"]
    pick = np.random.default_rng(0).choice(len(train), n, replace=False)
    feats = inception_features(train[np.sort(pick)], net, device, desc="inception (training)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=feats)
    tmp.replace(path)
    return train, feats


def compare(gen_feats: np.ndarray, real_feats: np.ndarray) -> dict:
    """FID, KID (mean, std over 100 subsets of half the smaller set), precision and recall (k = 3)."""
    kid, kid_std = kid_from_features(gen_feats, real_feats, subset_size=min(len(gen_feats), len(real_feats)) // 2)
    precision, recall = precision_recall(real_feats, gen_feats, k=3)
    return {"fid": round(fid_from_features(gen_feats, real_feats), 3), "kid": round(kid, 5),
            "kid_std": round(kid_std, 5), "precision": round(precision, 4), "recall": round(recall, 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="real images (folder or tar)")
    p.add_argument("--range", dest="range_", default=None, help="real images numbered FIRST-LAST, e.g. 8001-9000")
    p.add_argument("--n", type=int, default=1000, help="images of each kind")
    p.add_argument("--sampler", default="ddpm", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--images", default=None, help="use generated images from this .npz (key 'images', NxHxWx3 "
                                                  "uint8) instead of sampling, e.g. brought back from a GPU")
    p.add_argument("--grid", default=None, help="also write a 4x4 grid of the first 16 generated images here")
    add_source_arguments(p, prefix="train-", dest="train_sources", required=False,
                         help_data="the model's training images (repeatable, each with its --train-range) for the "
                                   "copy check and the real-vs-real floor")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.n < 2:
        p.error("--n must be at least 2")
    try:
        device = pick_device(a.device)
        w = load_weights(a.weights, device)
        size = w.unet.config.image_size
        net = load_inception(device)
        real_feats, real_share, cached = real_features(a.data, a.range_, size, a.n, net, device, Path(a.cache_dir))
        train = None
        if a.train_sources:
            train, train_feats = training_reference(a.train_sources, size, a.n, net, device, Path(a.cache_dir))
    except (WeightsError, DataError, MissingDependency, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    if a.images:
        with np.load(a.images, allow_pickle=False) as z:
            gen = z["images"][: a.n]
        if len(gen) < a.n or gen.shape[1:] != (size, size, 3) or gen.dtype != np.uint8:
            print(f"error: {a.images}: need {a.n} uint8 images of {size}x{size}x3, got {gen.shape} {gen.dtype}",
                  file=sys.stderr)
            return 2
    else:
        engine = SamplerEngine(w.unet, w.diffusion, device, pick_dtype(a.dtype, device))
        with tqdm(total=a.n * a.steps, desc=f"sampling {a.sampler} x{a.steps}", unit="img-step") as bar:
            gen = generate(engine, list(range(a.n)), a.sampler, a.steps, a.batch_size, progress=bar)
    gen_s = time.time() - t0
    if a.grid:
        Path(a.grid).write_bytes(png_bytes(grid(gen[:16], 4)))
    gen_feats = inception_features(gen, net, device, desc="inception (generated)")
    result = {
        "weights": str(a.weights), "sha256": w.sha256, "model": w.name, "resolution": size,
        "sampler": a.sampler if not a.images else f"from --images {a.images}", "steps": None if a.images else a.steps,
        "n": a.n,
        "real": {"data": str(a.data), "range": a.range_, "features_cached": cached},
        **compare(gen_feats, real_feats),
        "face_share_generated": round(face_share(gen), 4), "face_share_real": round(real_share, 4),
        "generate_seconds": round(gen_s, 1), "device": str(device), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    if train is not None:
        result["train"] = [{"data": src.path, "range": src.range_} for src in a.train_sources]
        result["real_vs_real"] = compare(train_feats, real_feats)
        result["copy_share_generated"] = round(copy_share(gen, train), 4)
        result["copy_share_real"] = round(copy_share(real_images(a.data, a.range_, size, a.n), train), 4)
    line = json.dumps(result)
    print(line)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
