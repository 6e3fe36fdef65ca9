"""Decode once into a uint8 cache, or decode every batch (what DataLoader workers would do)? Measured here.

    python bench/data_loading.py --out bench/results/data-loading.md
"""

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.data import frame, load_images, to_model_range  # noqa: E402
from report import command, emit, stamp  # noqa: E402

TAR = Path(__file__).resolve().parent.parent.parent / "shared/data/celeba/img_align_celeba_89x109_000001-009000.tar"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(TAR))
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    s = load_images(a.data, a.size, range_="1-8000", progress=False)
    decode_all = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(100):
        idx = torch.randint(0, len(s.names), (a.batch,), generator=g)
        to_model_range(s.images[idx])
    cached = (time.perf_counter() - t0) / 100
    tf = tarfile.open(a.data)
    members = [m for m in tf.getmembers() if m.name.endswith(".jpg")][:8000]
    t0 = time.perf_counter()
    for i in range(10):
        batch = [frame(Image.open(io.BytesIO(tf.extractfile(members[(i * a.batch + j) % 8000]).read())), a.size)
                 for j in range(a.batch)]
        torch.tensor(batch)
    per_batch = (time.perf_counter() - t0) / 10
    text = "\n".join([
        "# Data loading: decode once vs decode per batch", "",
        f"{stamp()}; "
        f"images at {a.size}x{a.size}",
        f"- command: `{command(__file__, argv)}`", "",
        "| what | time |", "| --- | --- |",
        f"| decode all 8,000 images once into a uint8 tensor ({s.images.numel() / 1e6:.1f} MB) | {decode_all:.1f} s |",
        f"| one batch of {a.batch} from the cache (index, to [-1, 1]) | {cached * 1e3:.2f} ms |",
        f"| one batch of {a.batch} decoded from the tar (what a DataLoader worker does per batch) | "
        f"{per_batch * 1e3:.0f} ms |",
        "", "A training step of the cpu32 preset at batch 64 takes about 1 s on these 2 cores, so decoding each batch",
        f"would add about {per_batch * 100:.0f}% to every step and, with DataLoader workers, take cores from the "
        "model;",
        f"the cache costs {decode_all:.0f} s once and {cached * 1e3:.2f} ms per batch. On a GPU it is moved to device",
        "memory once.", ""])
    emit(text, a.out)


if __name__ == "__main__":
    main()
