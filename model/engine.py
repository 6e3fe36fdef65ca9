"""The sampler engine: a batch of independent samples, each on its own trajectory, advanced step by step.

Each row of the batch has its own seed, sampler, step count and position. `step()` runs one U-Net forward for
the whole batch (through model/runner.py, which makes it fast on the device) and one vectorised update (see
model/diffusion.py for the coefficient form); or, where the runner chains steps (ONNX Runtime, at most one row per
core) and every row takes the plain update for the next k steps without a preview or its end among them, k steps
in one runner call with the same update and noise (StepOutput.steps says how many). Rows can be added and removed
between calls, which is what continuous batching in the service needs; `generate()` is the plain offline loop
built on the same engine, so the CLI and the service produce the same pixels.

Editing rows share the same step (model/edit.py): a row may start from a given image noised to its chain's top
timestep t_max (SDEdit), from a given x (interpolation between seeds), and may carry a known image and a mask whose
known pixels replace the row's after every update, noised to the level the update landed on with the row's own
counter-based noise (RePaint); after the last update they are the known pixels exactly. Plain rows in the same batch
are untouched by any of it (`torch.where` with a false mask), so they stay pixel-identical.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterable

import numpy as np
import torch

from .device import memory_allocated, pick_memory_format, release_cached_memory
from .diffusion import COEFS, MULTISTEP, STOCHASTIC, Diffusion, Sampler
from .noise import KNOWN_NOISE_BASE, SEED_LIMIT, gaussian
from .runner import ModelRunner
from .runner_onnx import ChainUnavailable
from .unet import UNet

# On CPU, a batch of at least this many rows draws its next noise on a helper thread while the U-Net runs: the
# shards' forward leaves the cores idle now and then, and the noise (~4 ms of a 43 ms step at 64 rows) fits in
# there. The 1000-step chain per step: 64 rows 45.2 -> 43.3 ms best (4%), 16 rows 1-3%, 4 rows no change
# (AVX-512 host, 2026-12-01, 6 interleaved rounds). The same noise either way: it is a pure function of its rows.
NOISE_AHEAD_ROWS = 16


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


@dataclass(frozen=True)
class SampleSpec:
    seed: int
    sampler: Sampler = "ddpm"
    steps: int = 1000
    preview_every: int = 0  # > 0: report the x0 estimate after every k-th step (and after the last)
    t_max: int | None = None  # the chain's first timestep (default T-1); lower: SDEdit from a given image
    jumps: tuple[int, int] = (1, 1)  # RePaint's (jump_length, jump_n_sample); (1, 1): none


@dataclass
class Edit:
    """What makes a row an edit (all (C, H, W) or (1, H, W) float tensors in the model's [-1, 1] range):
    image: the picture to start from (noised to t_max) and, with `keep`, the known pixels; keep: True where the
    image's pixels are kept (RePaint); x_start: the exact x to start from instead (interpolation)."""
    image: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    x_start: torch.Tensor | None = None


@dataclass
class _Row:
    group: Hashable
    index: int
    sampler: str
    steps: int  # rows of its coefficient table: the sampler's steps, and RePaint's forward steps if it jumps
    preview_every: int = 0
    masked: bool = False  # carries known pixels (RePaint)
    pos: int = 0


@dataclass
class StepOutput:
    """What one step produced: (group, index, HxWxC uint8 image) of the samples that finished, (group, index, step,
    HxWxC uint8 x0 estimate) of the samples that asked for a preview at this step, and (group, index) of the
    samples that finished with NaN or Inf in them (a faulty network: no image, never a black one)."""
    finished: list[tuple[Hashable, int, np.ndarray]]
    previews: list[tuple[Hashable, int, int, np.ndarray]]
    failed: list[tuple[Hashable, int]] = field(default_factory=list)
    steps: int = 1  # how many steps every row advanced (more than one where the runner chains steps)


class SamplerEngine:
    """memory_format: 'auto' (model/device.py; contiguous where the runner is ONNX Runtime, which takes NCHW),
    'channels_last', 'contiguous', or a torch.memory_format.
    runner, workers, cache_dir, spin: how the U-Net runs (model/runner.py's ModelRunner).

    Exception-safe: `step()` computes the new state first and commits it only when nothing failed, so after an
    error (a CUDA OOM, say) the same step can be retried and the images are those of an uninterrupted run.
    """

    def __init__(self, unet: UNet, diffusion: Diffusion, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, memory_format: str | torch.memory_format = "auto",
                 noise_chunk_elems: int | None = None, runner: str = "auto", workers: int | None = None,
                 cache_dir: Path | None = None, spin: bool | str = False):
        self.device = torch.device(device)
        self.dtype = dtype
        auto_format = memory_format == "auto"
        if isinstance(memory_format, str):
            memory_format = pick_memory_format(memory_format, self.device)
        self.memory_format = memory_format
        self.unet = unet.to(self.device, dtype).eval().to(memory_format=self.memory_format)
        self.runner = ModelRunner(self.unet, self.device, dtype, self.memory_format, runner, workers, cache_dir,
                                  spin=spin)
        if auto_format and self.runner.mode == "onnx":  # ORT takes NCHW: channels_last would cost 2 copies a step
            self.memory_format = torch.contiguous_format
            self.unet.to(memory_format=self.memory_format)
        self.diffusion = diffusion
        cfg = unet.config
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        # Noise is drawn for several steps per call: fewer launches on CUDA; on CPU calls of ~256k values are the
        # fastest per value (larger ones fall out of cache: 64 x 3x32x32 values for 21 steps at once cost 1.7x more
        # per step than for one step).
        if noise_chunk_elems is None:
            noise_chunk_elems = 1 << 18 if self.device.type == "cpu" else 1 << 22
        self.noise_chunk_elems = noise_chunk_elems
        self._table = torch.zeros(0, 1 + len(COEFS), dtype=torch.float32, device=self.device)  # t, then COEFS
        self._landing = torch.zeros(0, 2, dtype=torch.float32, device=self.device)  # RePaint's noise levels
        self._table_offsets: dict[tuple, tuple[int, int]] = {}  # (sampler, steps, t_max, jumps) -> (offset, rows)
        self.rows: list[_Row] = []
        self._stochastic = 0  # rows whose sampler adds noise (counted on the host: step() never syncs to ask)
        self._multistep = 0  # rows that need the previous x0 estimate
        self._masked = 0  # rows with known pixels (RePaint)
        empty = torch.zeros(0, *self.shape, device=self.device)
        self.x, self.x0_prev, self.known = empty, empty.clone(), empty.clone()
        self.keep = torch.zeros(0, 1, *self.shape[1:], dtype=torch.bool, device=self.device)
        self.seeds = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.offset = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._z: torch.Tensor | None = None  # noise for the next few steps of every row, (B, L, C, H, W)
        self._zcol = 0  # column of _z that the next step uses
        self._helper: ThreadPoolExecutor | None = None  # draws the noise during the forward (NOISE_AHEAD_ROWS)

    def __len__(self) -> int:
        return len(self.rows)

    # ---- batch membership ------------------------------------------------------------------------------
    def _to_device(self, values: list[int]) -> torch.Tensor:
        """A host list as an int64 device tensor; on CUDA copied from pinned memory without waiting for the GPU."""
        t = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _table_offset(self, spec: SampleSpec) -> tuple[int, int]:
        """(offset of the spec's coefficient table in the engine's, its number of rows)."""
        key = (spec.sampler, spec.steps, spec.t_max, tuple(spec.jumps))
        if key not in self._table_offsets:
            table = self.diffusion.coefficients(*key).to(self.device, torch.float32)
            landing = self.diffusion.landing(*key).to(self.device, torch.float32)
            self._table_offsets[key] = (self._table.shape[0], table.shape[0])
            self._table = torch.cat([self._table, table])
            self._landing = torch.cat([self._landing, landing])
        return self._table_offsets[key]

    def add(self, group: Hashable, specs: Iterable[SampleSpec], first_index: int = 0,
            edits: list[Edit | None] | None = None) -> None:
        """Add samples as indices first_index.. of `group`; they start at their own step 0 on the next step().
        edits: one Edit (or None for a plain row) per spec."""
        specs = list(specs)
        if not specs:
            return
        edits = list(edits) if edits is not None else [None] * len(specs)
        if len(edits) != len(specs):
            raise ValueError(f"{len(edits)} edits for {len(specs)} samples")
        for s in specs:
            if not 0 <= s.seed < SEED_LIMIT:
                raise ValueError(f"seed must be in [0, 2^63), got {s.seed}")
        tables = [self._table_offset(s) for s in specs]
        offsets = [o for o, _ in tables]
        seeds = self._to_device([s.seed for s in specs])
        zero = torch.zeros(len(specs), dtype=torch.int64, device=self.device)
        x_T = gaussian(seeds, zero, self.shape)  # noise index 0 (model/noise.py)
        known = torch.zeros_like(x_T)
        keep = torch.zeros(len(specs), 1, *self.shape[1:], dtype=torch.bool, device=self.device)
        for i, (s, e) in enumerate(zip(specs, edits)):
            if e is None:
                continue
            if e.x_start is not None:
                x_T[i] = e.x_start.to(self.device, torch.float32)
            elif e.image is not None:  # SDEdit: the image noised to the chain's first timestep, with the same eps
                t_top = self.diffusion.T - 1 if s.t_max is None else s.t_max
                x_T[i] = self.diffusion.q_sample(e.image.to(self.device, torch.float32)[None],
                                                 torch.tensor([t_top], device=self.device), x_T[i:i + 1])[0]
            if e.keep is not None:
                if e.image is None:
                    raise ValueError("a mask of known pixels needs the image they come from")
                known[i], keep[i] = e.image.to(self.device, torch.float32), e.keep.to(self.device, torch.bool)
        x, x0_prev = torch.cat([self.x, x_T]), torch.cat([self.x0_prev, torch.zeros_like(x_T)])
        seeds, pos = torch.cat([self.seeds, seeds]), torch.cat([self.pos, zero])
        offset = torch.cat([self.offset, self._to_device(offsets)])
        known, keep = torch.cat([self.known, known]), torch.cat([self.keep, keep])
        # commit (nothing below can fail)
        self.x, self.x0_prev, self.seeds, self.pos, self.offset = x, x0_prev, seeds, pos, offset
        self.known, self.keep = known, keep
        self.rows += [_Row(group, first_index + i, s.sampler, length, s.preview_every,
                           masked=e is not None and e.keep is not None)
                      for i, (s, e, (_, length)) in enumerate(zip(specs, edits, tables))]
        self._count_kinds()
        self._z = None  # refilled for all rows at the next step

    def _count_kinds(self) -> None:
        self._stochastic = sum(r.sampler in STOCHASTIC for r in self.rows)
        self._multistep = sum(r.sampler in MULTISTEP for r in self.rows)
        self._masked = sum(r.masked for r in self.rows)

    # per-row tensors, row i of each is self.rows[i]
    _STATE = ("x", "x0_prev", "seeds", "pos", "offset", "known", "keep")

    def _keep(self, keep: list[int], state: dict | None = None, z: torch.Tensor | None = None, zcol: int = 0) -> None:
        """Keep rows `keep` and commit, all or nothing. state/z/zcol: the per-row tensors and noise to keep rows of
        (default: the current ones)."""
        if state is None:
            state, z, zcol = {name: getattr(self, name) for name in self._STATE}, self._z, self._zcol
        if len(keep) < len(self.rows):
            idx = self._to_device(keep)
            state = {name: value.index_select(0, idx) for name, value in state.items()}
            z = z.index_select(0, idx) if z is not None else None
        for name, value in state.items():  # commit: nothing below can fail
            setattr(self, name, value)
        self._z, self._zcol = z, zcol
        self.rows = [self.rows[i] for i in keep]
        self._count_kinds()

    def cancel(self, group: Hashable) -> int:
        """Remove every sample of `group`; returns how many were removed."""
        keep = [i for i, r in enumerate(self.rows) if r.group != group]
        removed = len(self.rows) - len(keep)
        if removed:
            self._keep(keep)
        return removed

    def clear(self) -> None:
        """Drop every sample without touching the device (views only): usable after a device error."""
        for name in self._STATE:
            setattr(self, name, getattr(self, name)[:0])
        self._z = None
        self.rows = []
        self._count_kinds()

    def groups(self) -> set:
        return {r.group for r in self.rows}

    def memory_allocated(self) -> int:
        """Bytes of device memory held by tensors (0 on CPU)."""
        return memory_allocated(self.device)

    def release_cached_memory(self) -> None:
        release_cached_memory(self.device)

    # ---- one denoising step ----------------------------------------------------------------------------
    def _noise(self, need: int = 1) -> tuple[torch.Tensor, int]:
        """(noise table, column) for the coming `need` steps; the caller commits the column when they succeed."""
        if not self._noise_due(need):
            return self._z, self._zcol
        b = len(self.rows)
        chunk = max(need, min(64, self.noise_chunk_elems // max(1, b * int(np.prod(self.shape)))))
        j = torch.arange(chunk, device=self.device)
        idx = (self.pos[:, None] + 1 + j[None]).reshape(-1)  # z of step k has noise index k + 1
        return gaussian(self.seeds.repeat_interleave(chunk), idx, self.shape).view(b, chunk, *self.shape), 0

    def _noise_due(self, need: int = 1) -> bool:
        """Whether the noise table lacks the coming `need` steps' columns (and _noise() must draw)."""
        return self._z is None or self._zcol + need > self._z.shape[1]

    def _noise_ahead(self) -> Future | None:
        """Start drawing this step's noise on the helper thread, where that pays (NOISE_AHEAD_ROWS) and the noise
        table holds none for it; the caller takes `.result()` after the forward, in place of _noise()."""
        if not self._stochastic or self.device.type != "cpu" or len(self.rows) < NOISE_AHEAD_ROWS \
                or not self._noise_due():
            return None
        if self._helper is None:  # single-threaded torch, as the runner's shards: the cores are theirs
            self._helper = ThreadPoolExecutor(1, thread_name_prefix="noise", initializer=torch.set_num_threads,
                                              initargs=(1,))
        return self._helper.submit(self._noise)

    def _chain_length(self) -> int:
        """How many steps the next step() takes: the runner's chain length where it can chain this batch and every
        row takes the plain update for that many steps without a preview or its end in between, else 1."""
        k = getattr(self.runner, "chain_steps", 0)  # 0 for a stand-in runner (a plain function, in the tests)
        if k <= 1 or self._multistep or self._masked or not self.runner.can_chain(len(self.rows)):
            return 1
        if any(r.preview_every or r.steps - r.pos < k for r in self.rows):
            return 1
        return k

    @torch.inference_mode()
    def step(self) -> StepOutput:
        """Advance every sample one step (or `StepOutput.steps` of them, where the runner chains steps: the same
        images); return the finished images and the previews asked for."""
        if not self.rows:
            return StepOutput([], [])
        k = self._chain_length()
        if k > 1:
            return self._chained_steps(k)
        coef = self._table[self.offset + self.pos]
        t = coef[:, 0]
        a, b, c, d, e, f = coef[:, 1:, None, None, None].unbind(1)  # (B, 1, 1, 1) views
        # Calls that would change nothing are skipped, not made: on a busy CPU every torch call between two forwards
        # costs tens of microseconds (its code has gone cold), a few percent of a batch-1 step.
        x_in = self.x
        if x_in.dtype != self.dtype or not x_in.is_contiguous(memory_format=self.memory_format):
            x_in = x_in.to(self.dtype).contiguous(memory_format=self.memory_format)
        ahead = self._noise_ahead()
        out = self.runner(x_in, t)  # eps or v: the table folds in the conversion (model/diffusion.py)
        if out.dtype != torch.float32:
            out = out.float()
        x = a * self.x + b * out
        z, zcol = None, -1  # without noisy rows no noise is drawn (a noisy row can only come back through add())
        if self._stochastic:
            z, zcol = ahead.result() if ahead is not None else self._noise()
            x += c * z[:, zcol]
        x0_prev = self.x0_prev
        if self._multistep:
            x += d * self.x0_prev
            x0_prev = e * self.x + f * out
        if self._masked:  # RePaint: known pixels, noised to where this step landed (exact after the last step)
            level = self._landing[self.offset + self.pos]
            zk = gaussian(self.seeds, KNOWN_NOISE_BASE + self.pos, self.shape)
            known_t = level[:, 0].view(-1, 1, 1, 1) * self.known + level[:, 1].view(-1, 1, 1, 1) * zk
            x = torch.where(self.keep, known_t, x)
        previews = []
        want = [i for i, r in enumerate(self.rows)
                if r.preview_every and ((r.pos + 1) % r.preview_every == 0 or r.pos + 1 == r.steps)]
        if want:  # the x0 estimate, only for the rows that asked, only at their preview steps
            x0_hat = x0_prev[want] if self._multistep else e[want] * self.x[want] + f[want] * out[want]
            finite = torch.isfinite(x0_hat).flatten(1).all(1).cpu().tolist()
            images = to_uint8(x0_hat).cpu().numpy()
            previews = [(self.rows[i].group, self.rows[i].index, self.rows[i].pos + 1, img)
                        for i, img, ok in zip(want, images, finite) if ok]
        return self._advance(x, x0_prev, z, zcol + 1, 1, previews)

    def _chained_steps(self, k: int) -> StepOutput:
        """k plain steps in one runner call (model/onnx_chain.py): the same update and noise as k step()s."""
        idx = self.offset[None] + self.pos[None] + torch.arange(k, device=self.device)[:, None]  # (k, B)
        coef = self._table[idx][..., :4]  # t, a, b, c
        z, zcol = None, -k
        if self._stochastic:
            z, zcol = self._noise(k)
            zk = z[:, zcol:zcol + k].transpose(0, 1)
        else:
            zk = torch.zeros(k, len(self.rows), *self.shape, device=self.device)
        try:
            x = self.runner.steps(self.x, coef, zk)
        except ChainUnavailable:  # nothing ran and the runner chains no more: this call takes one step
            return self.step()
        return self._advance(x, self.x0_prev, z, zcol + k, k, [])

    def _advance(self, x: torch.Tensor, x0_prev: torch.Tensor, z: torch.Tensor | None, zcol: int, k: int,
                 previews: list) -> StepOutput:
        """Commit `k` steps that took every row to `x`: hand out the rows that finished and keep the others."""
        pos = self.pos + k
        finished = [i for i, r in enumerate(self.rows) if r.pos + k == r.steps]
        done, failed = [], []
        if finished:
            last = x[finished]
            finite = torch.isfinite(last).flatten(1).all(1).cpu().tolist()  # one sync with the images below
            images = to_uint8(last).cpu().numpy()
            for i, img, ok in zip(finished, images, finite):
                if ok:
                    done.append((self.rows[i].group, self.rows[i].index, img))
                else:
                    failed.append((self.rows[i].group, self.rows[i].index))
        state = {"x": x, "x0_prev": x0_prev, "seeds": self.seeds, "pos": pos, "offset": self.offset,
                 "known": self.known, "keep": self.keep}
        gone = set(finished)
        self._keep([i for i in range(len(self.rows)) if i not in gone], state, z, zcol)  # commit the steps
        for r in self.rows:
            r.pos += k
        return StepOutput(done, previews, failed, k)


def run(engine: SamplerEngine, specs: list[SampleSpec], edits: list[Edit | None] | None = None,
        batch_size: int = 16, progress=None) -> np.ndarray:
    """Images of `specs` (N, H, W, C uint8), with their edits if given, `batch_size` rows at a time.
    `progress`: a tqdm-like bar or None (updated by the rows in the batch at every step)."""
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(specs), batch_size):
        chunk = specs[start:start + batch_size]
        engine.add(start, chunk, edits=None if edits is None else edits[start:start + batch_size])
        while len(engine):
            step = engine.step()
            for _, index, img in step.finished:
                out[start + index] = img
            for _, index in step.failed:
                raise RuntimeError(f"sample {start + index} (seed {chunk[index].seed}) came out non-finite")
            if progress is not None:
                progress.update(len(chunk) * step.steps)
    return np.stack([out[i] for i in range(len(specs))])


def generate(engine: SamplerEngine, seeds: list[int], sampler: Sampler = "ddpm", steps: int = 1000,
             batch_size: int = 16, progress=None) -> np.ndarray:
    """Images for `seeds` (N, H, W, C uint8), `batch_size` at a time: plain sampling through run()."""
    return run(engine, [SampleSpec(s, sampler, steps) for s in seeds], None, batch_size, progress)
