"""Counter-based Gaussian noise: a sample's noise is a pure function of (seed, noise index, element).

A sample's initial x_T uses noise index 0 and the z of its k-th reverse step index k + 1, so its trajectory
does not depend on which other samples share its batch or on the step at which it joined. The noise that RePaint
adds to the known pixels after step k uses index KNOWN_NOISE_BASE + k (model/engine.py). Uniforms come from
Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), the generator behind
cuRAND's and PyTorch's CUDA RNG, written in integer tensor ops so one call makes the noise for a whole batch on
any device; normals from the Box-Muller transform. On CPU the integer rounds run in NumPy's uint64, where a 32x32-bit
product is one multiply (torch has no uint64 multiply, so its int64 version splits each product in four): the same
words, ~5x faster (the rounds for 64 x 3x32x32 values: 14.6 -> 3.0 ms on 2 cores; a whole step's noise 14.9 -> 4.6
ms), which matters at large batches, where the noise of a step cost a tenth of the U-Net's forward.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
SEED_LIMIT = 2**63  # seeds are in [0, 2^63): Philox's 64-bit key, held as an int64


def image_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a request's n images: image i uses seed + i (the one rule for the CLIs, the service and the
    engine), all in [0, SEED_LIMIT)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= seed or seed + n - 1 >= SEED_LIMIT:
        raise ValueError(f"seeds seed..seed+n-1 must lie in [0, 2^63), got {seed}..{seed + n - 1}")
    return [seed + i for i in range(n)]
KNOWN_NOISE_BASE = 1 << 31  # noise indices of RePaint's known-pixel noise, apart from the chain's own
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m * x for 32-bit m and x, held in int64 without overflow."""
    a = x * (m & 0xFFFF)  # < 2^48
    b = x * (m >> 16)  # < 2^48
    low = a + ((b & 0xFFFF) << 16)  # < 2^49
    return (b >> 16) + (low >> 32), low & _MASK32


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor], rounds: int = 10) -> list[torch.Tensor]:
    """Philox4x32: four 32-bit counter words and two key words (int64 tensors, broadcastable) -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for i in range(rounds):
        if i:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def philox4x32_numpy(counter: list[np.ndarray], key: list[np.ndarray], rounds: int = 10) -> list[np.ndarray]:
    """philox4x32 on uint64 NumPy arrays holding 32-bit words (broadcastable): the same words, one multiply each."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    mask, s32 = np.uint64(_MASK32), np.uint64(32)
    m0, m1, w0, w1 = (np.uint64(v) for v in (_M0, _M1, _W0, _W1))
    for i in range(rounds):
        if i:
            k0, k1 = (k0 + w0) & mask, (k1 + w1) & mask
        p0, p1 = c0 * m0, c2 * m1  # < 2^64: exact
        c0, c1, c2, c3 = (p1 >> s32) ^ c1 ^ k0, p1 & mask, (p0 >> s32) ^ c3 ^ k1, p0 & mask
    return [c0, c1, c2, c3]


def _uniform_bits_numpy(seeds: torch.Tensor, noise_index: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """Philox words >> 8 (24-bit integers) of counters (block, noise_index, 0, 0) under key seed: 4 x (B, blocks),
    from CPU tensors (B, 1), by NumPy's uint64 rounds (the CPU's path)."""
    s, i = seeds.numpy().astype(np.uint64), noise_index.numpy().astype(np.uint64)
    words = philox4x32_numpy([np.arange(blocks, dtype=np.uint64)[None], i & _MASK32, 0, 0],
                             [s & _MASK32, (s >> np.uint64(32)) & _MASK32])
    return [torch.from_numpy((np.broadcast_to(w, (s.shape[0], blocks)) >> np.uint64(8)).astype(np.int32))
            for w in words]


def _uniform_bits_torch(seeds: torch.Tensor, noise_index: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """The same words by torch's int64 ops on seeds' device (a GPU's path; it runs on CPU tensors too)."""
    key = [seeds & _MASK32, (seeds >> 32) & _MASK32]
    c0 = torch.arange(blocks, device=seeds.device, dtype=torch.int64).view(1, -1)
    zero = torch.zeros_like(noise_index)
    return [w >> 8 for w in philox4x32([c0, noise_index & _MASK32, zero, zero], key)]


def gaussian(seeds: torch.Tensor, noise_index: torch.Tensor, shape: tuple[int, ...],
             philox_ops: str | None = None) -> torch.Tensor:
    """Standard normal noise of shape (B, *shape), float32, on seeds' device.

    seeds: (B,) int64 in [0, 2^63); noise_index: (B,) int64 in [0, 2^32). Row i depends only on
    (seeds[i], noise_index[i]), never on the other rows. philox_ops: who runs Philox's integer rounds, "numpy"
    (CPU tensors only) or "torch"; None picks NumPy on the CPU and torch elsewhere. Both give the same bits: the
    choice exists so that tests run a GPU's path on the CPU.
    """
    ops = philox_ops or ("numpy" if seeds.device.type == "cpu" else "torch")
    if ops not in ("numpy", "torch"):
        raise ValueError(f"philox_ops must be numpy or torch, got {philox_ops!r}")
    uniform_bits = _uniform_bits_numpy if ops == "numpy" else _uniform_bits_torch
    n = math.prod(shape)
    blocks = -(-n // 4)
    seeds, noise_index = seeds.view(-1, 1), noise_index.view(-1, 1)
    # 24-bit uniforms in (0, 1): exact in float32, never 0, so log() is finite.
    u = [(bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24)) for bits in uniform_bits(seeds, noise_index, blocks)]
    r01, r23 = torch.sqrt(-2.0 * torch.log(u[0])), torch.sqrt(-2.0 * torch.log(u[2]))
    th01, th23 = (2 * math.pi) * u[1], (2 * math.pi) * u[3]
    z = torch.stack([r01 * torch.cos(th01), r01 * torch.sin(th01), r23 * torch.cos(th23), r23 * torch.sin(th23)], -1)
    return z.reshape(seeds.shape[0], blocks * 4)[:, :n].reshape(seeds.shape[0], *shape)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two Gaussian noise tensors (the DDIM paper's interpolation of x_T): stays
    at the norm a Gaussian sample has, where a straight line between them would shrink it. w = 0 gives a, 1 gives b."""
    if w == 0:
        return a.clone()
    if w == 1:
        return b.clone()
    af, bf = a.double().flatten(), b.double().flatten()
    omega = torch.arccos((af @ bf / (af.norm() * bf.norm())).clamp(-1, 1))
    so = torch.sin(omega)
    if so < 1e-6:  # the same (or opposite) direction, e.g. seed_a == seed_b: the straight line is the path
        return ((1 - w) * a.double() + w * b.double()).to(a.dtype)
    out = (torch.sin((1 - w) * omega) / so) * a.double() + (torch.sin(w * omega) / so) * b.double()
    return out.to(a.dtype)

