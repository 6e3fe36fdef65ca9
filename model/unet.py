"""The noise predictor eps_theta(x_t, t): the DDPM U-Net of Ho et al. (2020).

The layout follows the reference implementation (and the DDIM paper's CelebA-64 model): sinusoidal timestep
embedding and a two-layer MLP; residual blocks (GroupNorm, SiLU, conv, timestep projection, GroupNorm, SiLU,
dropout, conv); single-head self-attention at chosen resolutions; strided-conv downsampling with the
reference's asymmetric padding; nearest-neighbour upsampling followed by a conv; skip connections between
matching levels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    image_size: int = 64
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32

    def __post_init__(self) -> None:
        # Accept lists (from JSON) but store tuples so the config is hashable and compares equal.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mult) - 1}")
        for ch in {self.base_channels * m for m in self.channel_mult}:
            if ch % self.num_groups:
                raise ValueError(f"{ch} channels are not divisible into {self.num_groups} GroupNorm groups")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS: dict[str, UNetConfig] = {
    # The CelebA 64x64 model of the DDIM paper (Song et al. 2021): ~78.7M parameters, 48 GFLOP per forward.
    "celeba64": UNetConfig(),
    # Smaller 64x64 models for short GPU budgets (python -m train.pick_preset chooses among them by measured step
    # rate), each under 10M parameters so its fp16 weights stay under 20 MB: 8.95M / 11.8 GFLOP, 5.04M / 6.7,
    # 2.25M / 3.0 per forward.
    "celeba64-9m": UNetConfig(base_channels=64, channel_mult=(1, 2, 2, 2)),
    "celeba64-5m": UNetConfig(base_channels=48, channel_mult=(1, 2, 2, 2), num_groups=16),
    "celeba64-2m": UNetConfig(base_channels=32, channel_mult=(1, 2, 2, 2)),
    # The CPU demo model shipped in weights/: 0.69M parameters, 0.19 GFLOP per image. Chosen by measurement so a
    # 1000-step request for 4 images fits in 30 s on 2 CPU cores (bench/results/cpu-preset.md).
    "cpu32": UNetConfig(image_size=32, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                        attn_resolutions=(8,), dropout=0.1, num_groups=8),
    # cpu32 one level shallower (lowest resolution 16x16, attention only in the middle): of the variants timed, the
    # one whose 1000 batch-1 forwards came near 3 s on 2 cores. Trained once and not shipped: FID 152 against
    # cpu32's 75, and 4.3 s a request all the same (bench/results/cheaper-networks-cpu.md, issue 21).
    "cpu32-lite": UNetConfig(image_size=32, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                             attn_resolutions=(), dropout=0.1, num_groups=8),
    # For tests: an 8x8 model that runs the real 1000-step loop in seconds.
    "tiny": UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0, num_groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, [sin, cos] halves, as in the DDPM reference code."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2)  # b, 3, hw, c
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # b, hw, c
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TF "SAME" padding for stride 2, as in the reference


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """Residual blocks (each optionally followed by attention) at one resolution, then a resampler."""

    def __init__(self, blocks: list[ResBlock], attns: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(attns)
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, g, drop = cfg.base_channels, cfg.num_groups, cfg.dropout
        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def attn_or_id(c: int, res: int) -> nn.Module:
            return AttnBlock(c, g) if res in cfg.attn_resolutions else nn.Identity()

        skip_chs, cur, res = [ch], ch, cfg.image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mult):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(cur, out, temb_ch, drop, g))
                attns.append(attn_or_id(out, res))
                cur = out
                skip_chs.append(cur)
            last = i == len(cfg.channel_mult) - 1
            self.down.append(Level(blocks, attns, nn.Identity() if last else Downsample(cur)))
            if not last:
                skip_chs.append(cur)
                res //= 2

        self.mid1 = ResBlock(cur, cur, temb_ch, drop, g)
        self.mid_attn = AttnBlock(cur, g)
        self.mid2 = ResBlock(cur, cur, temb_ch, drop, g)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            out = ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(cur + skip_chs.pop(), out, temb_ch, drop, g))
                attns.append(attn_or_id(out, res))
                cur = out
            self.up.append(Level(blocks, attns, Upsample(cur) if i != 0 else nn.Identity()))
            if i != 0:
                res *= 2

        self.norm_out = nn.GroupNorm(g, cur)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy images; t: (B,) timestep indices in [0, T). Returns (B, C, H, W): the weights'
        prediction, eps or v (their schedule says which; model/diffusion.py turns either into eps)."""
        temb = self.temb(timestep_embedding(t, self.config.base_channels).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(h, temb))
                hs.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for level in self.up:
            for block, attn in zip(level.blocks, level.attns):
                h = attn(block(torch.cat([h, hs.pop()], dim=1), temb))
            h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
