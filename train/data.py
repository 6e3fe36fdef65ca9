"""CelebA (or any folder or tar of face images) -> a uint8 tensor cache of framed, resized images.

Sources: the official `img_align_celeba/` folder of 178x218 JPEGs (with `list_eval_partition.txt` beside or
inside it, partition 0 trains), any folder of images, or a tar of them (such as ../shared/data/celeba/).
Framing (`celeba`): the 128x128 box centred at (89, 121) of a 178x218 image used by DDIM's CelebA-64, scaled
to the image's own size; `center`: the largest centred square. `auto` picks `celeba` for images with CelebA's
aspect ratio. Images are decoded once into an (N, 3, S, S) uint8 tensor: 8,000 images at 32x32 are 25 MB and
decode in seconds, after which a batch is an index into memory (bench/results/data-loading.md).
"""

from __future__ import annotations

import argparse
import io
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from model.images import CELEBA_BOX, CELEBA_H, CELEBA_W, frame, frame_box  # noqa: F401 (re-exported)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class DataError(ValueError):
    """Training data that cannot be used; the message names the path and the problem."""


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    names: list[str]
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) of unreadable files


def parse_range(text: str | None) -> tuple[int, int] | None:
    """'1-8000' -> (1, 8000): keep files whose name is a number in that range (CelebA's 000001.jpg ...)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m or int(m.group(1)) > int(m.group(2)):
        raise DataError(f"--range {text!r}: expected FIRST-LAST, e.g. 1-8000")
    return int(m.group(1)), int(m.group(2))


def _in_range(name: str, rng: tuple[int, int] | None) -> bool:
    if rng is None:
        return True
    stem = Path(name).stem
    return stem.isdigit() and rng[0] <= int(stem) <= rng[1]


def _partition(root: Path) -> dict[str, int] | None:
    for cand in (root / "list_eval_partition.txt", root.parent / "list_eval_partition.txt"):
        if cand.is_file():
            parts = {}
            for line in cand.read_text().split("\n"):
                bits = line.split()
                if len(bits) == 2 and bits[1].isdigit():
                    parts[bits[0]] = int(bits[1])
            return parts
    return None


def _entries(path: Path, rng, partition: int | None):
    """Yield (name, bytes-loader) for each candidate image file, sorted by name."""
    if path.is_file() and tarfile.is_tarfile(path):
        tf = tarfile.open(path)
        members = sorted((m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_EXTS)
                          and _in_range(m.name, rng)), key=lambda m: m.name)
        return [(m.name, (lambda m=m: tf.extractfile(m).read())) for m in members]
    if path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.suffix == ".tar")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files and len(tars) == 1:
            return _entries(tars[0], rng, partition)
        if not files and len(tars) > 1:
            raise DataError(f"{path}: holds several tars ({', '.join(t.name for t in tars)}); name one")
        parts = _partition(path) if partition is not None else None
        if parts is not None:
            files = [f for f in files if parts.get(f.name) == partition]
        return [(str(f.relative_to(path)), f.read_bytes) for f in files if _in_range(f.name, rng)]
    raise DataError(f"{path}: not a folder of images or a tar of them")


def load_images(path: str | Path, size: int, *, range_: str | None = None, framing: str = "auto",
                partition: int | None = 0, min_images: int = 1, progress: bool = True) -> ImageSet:
    """Decode every image under `path` (folder or tar), framed and resized to size x size."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    entries = _entries(path, parse_range(range_), partition)
    if not entries:
        raise DataError(f"{path}: no images found" + (f" in range {range_}" if range_ else "")
                        + f" (looked for {', '.join(IMAGE_EXTS)})")
    arrays, names, skipped, sizes = [], [], [], {}
    for name, read in tqdm(entries, desc=f"decoding {path.name}", unit="img", disable=not progress):
        try:
            with Image.open(io.BytesIO(read())) as img:
                img.load()
                sizes.setdefault(img.size, name)
                arrays.append(frame(img, size, framing))
                names.append(name)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            skipped.append((name, f"{type(e).__name__}: {e}"))
    if len(sizes) > 1 and framing != "center":
        listed = ", ".join(f"{w}x{h} (e.g. {n})" for (w, h), n in list(sizes.items())[:4])
        raise DataError(f"{path}: images of mixed sizes: {listed}. The face framing is defined on one image size; "
                        "resize them to one size first, or pass --framing center to take centred squares")
    if len(arrays) < min_images:
        raise DataError(f"{path}: {len(arrays)} readable images, at least {min_images} needed"
                        + (f" ({len(skipped)} unreadable, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, names, str(path), skipped)


@dataclass(frozen=True)
class Source:
    """One place to read training images from, with the numbers to keep (None: all)."""
    path: str
    range_: str | None = None

    def __str__(self) -> str:
        return self.path + (f" [{self.range_}]" if self.range_ else "")


class SourceAction(argparse.Action):
    """argparse: `--data PATH` starts a Source (repeatable); `--range FIRST-LAST` sets the range of the --data
    just before it, so `--data A.tar --range 1-8000 --data B.tar` reads A's images 1-8000 and all of B's."""

    def __call__(self, parser, namespace, value, option_string=None):
        sources = list(getattr(namespace, self.dest, None) or [])
        if option_string.endswith("range"):
            if not sources:
                parser.error(f"{option_string} must follow the {option_string[:-5] + 'data'} it applies to")
            if sources[-1].range_ is not None:
                data = option_string[:-5] + "data"
                parser.error(f"{data} {sources[-1].path}: two {option_string} options; give each {data} at most one")
            sources[-1] = Source(sources[-1].path, value)
        else:
            sources.append(Source(value))
        setattr(namespace, self.dest, sources)


def add_source_arguments(p: argparse.ArgumentParser, prefix: str = "", dest: str = "sources", required: bool = True,
                         help_data: str = "") -> None:
    """--{prefix}data (repeatable) and --{prefix}range (per --data) into `dest`, a list of Source."""
    p.add_argument(f"--{prefix}data", dest=dest, action=SourceAction, required=required, metavar="PATH",
                   help=help_data or "image folder, CelebA's img_align_celeba/, or a tar of images; repeat it "
                                     "to train on several")
    p.add_argument(f"--{prefix}range", dest=dest, action=SourceAction, metavar="FIRST-LAST",
                   help=f"keep the images of the --{prefix}data before it numbered FIRST-LAST, e.g. 1-8000")


def load_sources(sources: list[Source], size: int, *, framing: str = "auto", min_images: int = 1,
                 progress: bool = True) -> ImageSet:
    """Every source decoded (load_images) and joined into one set, in the order given; names are `source:name`
    when there are several, so a duplicate across sources is still told apart."""
    sets = [load_images(s.path, size, range_=s.range_, framing=framing, progress=progress) for s in sources]
    if len(sets) == 1:
        one = sets[0]
    else:
        sizes = {tuple(s.images.shape[1:]) for s in sets}
        if len(sizes) > 1:  # cannot happen for one size and framing; a guard against a silent mismatch
            raise DataError(f"sources decode to different shapes: {sorted(sizes)}")
        one = ImageSet(torch.cat([s.images for s in sets]),
                       [f"{Path(s.source).name}:{n}" for s in sets for n in s.names],
                       " + ".join(str(src) for src in sources),
                       [(f"{Path(s.source).name}:{n}", why) for s in sets for n, why in s.skipped])
    if len(one.names) < min_images:
        raise DataError(f"{one.source}: {len(one.names)} readable images, at least {min_images} needed")
    return one


def mirror(batch: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """The NCHW `batch` with the images where the boolean `which` is true flipped left-right (augmentation)."""
    return torch.where(which[:, None, None, None], batch.flip(3), batch)


def to_model_range(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return batch_u8.float() / 127.5 - 1.0
