"""The sampler engine: a batch of independent samples, each on its own trajectory, advanced one step per call.

Each row of the batch has its own seed, sampler, step count and position. `step()` runs one U-Net forward for
the whole batch (through model/runner.py, which makes it fast on the device) and one vectorised update (see
model/diffusion.py for the coefficient form). Rows can be added and removed between steps, which is what
continuous batching in the service needs; `generate()` is the plain offline loop built on the same engine, so
the CLI and the service produce the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Iterable

import numpy as np
import torch

from .diffusion import Diffusion
from .noise import gaussian
from .runner import ModelRunner
from .unet import UNet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA (fp16 where the GPU has no bf16), fp32 on CPU (no fast bf16 on most CPUs)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@dataclass(frozen=True)
class SampleSpec:
    seed: int
    sampler: str = "ddpm"
    steps: int = 1000


@dataclass
class _Row:
    group: Hashable
    index: int
    sampler: str
    steps: int
    pos: int = 0


class SamplerEngine:
    def __init__(self, unet: UNet, diffusion: Diffusion, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, channels_last: bool = True, noise_chunk_elems: int = 1 << 22,
                 runner: str = "auto", workers: int | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.unet = unet.to(self.device, dtype).eval().to(memory_format=self.memory_format)
        self.runner = ModelRunner(self.unet, self.device, dtype, self.memory_format, runner, workers)
        self.diffusion = diffusion
        cfg = unet.config
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.noise_chunk_elems = noise_chunk_elems
        self._table = torch.zeros(0, 7, dtype=torch.float32, device=self.device)
        self._table_offsets: dict[tuple[str, int], int] = {}
        self.rows: list[_Row] = []
        self._stochastic = 0  # rows whose sampler adds noise (counted on the host: step() never syncs to ask)
        self._multistep = 0  # rows that need the previous x0 estimate
        empty = torch.zeros(0, *self.shape, device=self.device)
        self.x, self.x0_prev = empty, empty.clone()
        self.seeds = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.offset = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._z: torch.Tensor | None = None  # noise for the next few steps of every row, (B, L, C, H, W)
        self._zcol = 0

    def __len__(self) -> int:
        return len(self.rows)

    # ---- batch membership ------------------------------------------------------------------------------
    def _table_offset(self, sampler: str, steps: int) -> int:
        key = (sampler, steps)
        if key not in self._table_offsets:
            table = self.diffusion.coefficients(sampler, steps).to(self.device, torch.float32)
            self._table_offsets[key] = self._table.shape[0]
            self._table = torch.cat([self._table, table])
        return self._table_offsets[key]

    def add(self, group: Hashable, specs: Iterable[SampleSpec], first_index: int = 0) -> None:
        """Add samples as indices first_index.. of `group`; they start at their own step 0 on the next step()."""
        specs = list(specs)
        if not specs:
            return
        offsets = [self._table_offset(s.sampler, s.steps) for s in specs]
        for s in specs:
            if not 0 <= s.seed < 2**63:
                raise ValueError(f"seed must be in [0, 2^63), got {s.seed}")
        seeds = torch.tensor([s.seed for s in specs], dtype=torch.int64, device=self.device)
        zero = torch.zeros(len(specs), dtype=torch.int64, device=self.device)
        x_T = gaussian(seeds, zero, self.shape)
        self.x = torch.cat([self.x, x_T])
        self.x0_prev = torch.cat([self.x0_prev, torch.zeros_like(x_T)])
        self.seeds = torch.cat([self.seeds, seeds])
        self.pos = torch.cat([self.pos, zero])
        self.offset = torch.cat([self.offset, torch.tensor(offsets, dtype=torch.int64, device=self.device)])
        self.rows += [_Row(group, first_index + i, s.sampler, s.steps) for i, s in enumerate(specs)]
        self._count_kinds()
        self._z = None  # refilled for all rows at the next step

    def _count_kinds(self) -> None:
        self._stochastic = sum(r.sampler == "ddpm" for r in self.rows)
        self._multistep = sum(r.sampler == "dpm-solver++" for r in self.rows)

    def _keep(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.int64, device=self.device)
        for name in ("x", "x0_prev", "seeds", "pos", "offset"):
            setattr(self, name, getattr(self, name).index_select(0, idx))
        if self._z is not None:
            self._z = self._z.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        self._count_kinds()

    def cancel(self, group: Hashable) -> int:
        """Remove every sample of `group`; returns how many were removed."""
        keep = [i for i, r in enumerate(self.rows) if r.group != group]
        removed = len(self.rows) - len(keep)
        if removed:
            self._keep(keep)
        return removed

    def groups(self) -> set:
        return {r.group for r in self.rows}

    # ---- one denoising step ----------------------------------------------------------------------------
    def _noise(self) -> torch.Tensor:
        if self._z is None or self._zcol == self._z.shape[1]:
            b = len(self.rows)
            chunk = max(1, min(64, self.noise_chunk_elems // max(1, b * int(np.prod(self.shape)))))
            j = torch.arange(chunk, device=self.device)
            idx = (self.pos[:, None] + 1 + j[None]).reshape(-1)  # z of step k has noise index k + 1
            self._z = gaussian(self.seeds.repeat_interleave(chunk), idx, self.shape).view(b, chunk, *self.shape)
            self._zcol = 0
        z = self._z[:, self._zcol]
        self._zcol += 1
        return z

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, int, np.ndarray]]:
        """Advance every sample one step; return (group, index, HxWxC uint8 image) for those that finished."""
        if not self.rows:
            return []
        coef = self._table[self.offset + self.pos]
        t = coef[:, 0]
        a, b, c, d, e, f = (coef[:, i].view(-1, 1, 1, 1) for i in range(1, 7))
        x_in = self.x.to(self.dtype).contiguous(memory_format=self.memory_format)
        out = self.runner(x_in, t).float()  # eps or v: the table folds in the conversion (model/diffusion.py)
        x_new = a * self.x + b * out
        if self._stochastic:
            x_new += c * self._noise()
        if self._multistep:
            x_new += d * self.x0_prev
            self.x0_prev = e * self.x + f * out
        self.x = x_new
        self.pos += 1
        finished = []
        for i, r in enumerate(self.rows):
            r.pos += 1
            if r.pos == r.steps:
                finished.append(i)
        if not finished:
            return []
        images = to_uint8(self.x[finished]).cpu().numpy()
        done = [(self.rows[i].group, self.rows[i].index, img) for i, img in zip(finished, images)]
        self._keep([i for i in range(len(self.rows)) if i not in set(finished)])
        return done


def generate(engine: SamplerEngine, seeds: list[int], sampler: str = "ddpm", steps: int = 1000,
             batch_size: int = 16, progress=None) -> np.ndarray:
    """Images for `seeds` (N, H, W, C uint8), `batch_size` at a time. `progress`: a tqdm-like bar or None."""
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        engine.add(start, [SampleSpec(s, sampler, steps) for s in chunk])
        while len(engine):
            for _, index, img in engine.step():
                out[start + index] = img
            if progress is not None:
                progress.update(len(chunk))
    return np.stack([out[i] for i in range(len(seeds))])
