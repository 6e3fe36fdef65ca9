"""A U-Net without normalization layers for the batch-1 CPU step: cpu32's shape built from magnitude-preserving
layers after EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models").

On 2 cores a batch-1 forward of cpu32 is bound by the number of graph nodes ONNX Runtime runs, and its 27 GroupNorms
(six nodes each) are half of them (docs/cpu-latency.md). EDM2's recipe keeps activations at unit scale without
normalising them: every conv and linear row is held at unit norm (forced weight normalisation) and each layer's output
is scaled by constants so that unit-variance inputs give unit-variance outputs (MP-SiLU, MP sums). Here those
constants sit where they fold into the next or previous convolution: `MPUNet` is the trained form, `Baked` the same
function in plain layers (convolutions, SiLUs, the residual adds, the attention and one multiply per block for the
time conditioning), which is what inference runs and exports.

Differences from EDM2: no pixel norm in the encoder, plain concatenation of the skips, residuals x + g y (g fixed)
where the skip is the identity, a conv bias on the input instead of a constant channel, the VP schedule's input scale
c_in(t) = 1/sqrt(alphabar_t sd^2 + 1 - alphabar_t), the timestep's sinusoidal embedding. Like the weights it is
distilled from (train/distill.py), it predicts what its schedule's `prediction` says (v for cpu32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .unet import UNetConfig, timestep_embedding

RB, AB = 0.3, 0.3  # residual and attention balance (EDM2's 0.3)
S_RB = math.sqrt((1 - RB) ** 2 + RB ** 2)
MP_SILU = 0.596  # std of silu(x), x ~ N(0, 1)


def normalize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Each row (output channel) to unit RMS."""
    norm = torch.linalg.vector_norm(x, dim=list(range(1, x.ndim)), keepdim=True, dtype=torch.float32)
    return x / torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel())).to(x.dtype)


class MPConv(nn.Module):
    """A conv (k > 0) or linear (k = 0) layer without bias whose rows are kept at unit norm, times gain/sqrt(fan-in)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.k = k
        self.weight = nn.Parameter(torch.randn(cout, cin, *([k, k] if k else [])))

    def w(self, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))  # forced weight normalisation
        return normalize(self.weight) * (gain / math.sqrt(self.weight[0].numel()))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        w = self.w(gain)
        return x @ w.t() if not self.k else F.conv2d(x, w, padding=self.k // 2)


class Block(nn.Module):
    """A residual block, optionally followed by single-head attention. Encoder blocks take their 1x1 channel
    change first; decoder blocks on their skip path."""

    def __init__(self, cin: int, cout: int, emb_ch: int, flavor: str, attention: bool = False):
        super().__init__()
        self.flavor = flavor
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(cout if flavor == "enc" else cin, cout, 3)
        self.emb_linear = MPConv(emb_ch, cout, 0)
        self.conv_res1 = MPConv(cout, cout, 3)
        self.conv_skip = MPConv(cin, cout, 1) if cin != cout else None
        self.attn_qkv = MPConv(cout, cout * 3, 1) if attention else None
        self.attn_proj = MPConv(cout, cout, 1) if attention else None

    @property
    def enc_skip(self) -> bool:
        return self.flavor == "enc" and self.conv_skip is not None

    def res_gains(self) -> tuple[float, float]:
        """(skip gain, branch gain): an MP sum where a decoder's 1x1 skip conv can take its gain, else x + g y."""
        if self.flavor == "dec" and self.conv_skip is not None:
            return (1 - RB) / S_RB, RB / S_RB
        return 1.0, RB / (1 - RB)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.enc_skip:
            x = self.conv_skip(x)
        y = self.conv_res0(F.silu(x) / MP_SILU)
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = self.conv_res1(F.silu(y * c[:, :, None, None]) / MP_SILU)
        if self.conv_skip is not None and not self.enc_skip:
            x = self.conv_skip(x)
        gs, gy = self.res_gains()
        x = x * gs + y * gy
        if self.attn_qkv is not None:
            b, ch, h, w = x.shape
            q, k, v = self.attn_qkv(x).reshape(b, 3 * ch, h * w).split(ch, dim=1)
            a = torch.softmax(torch.matmul(q.transpose(1, 2), k) / math.sqrt(ch), dim=-1)
            x = x + self.attn_proj(torch.matmul(v, a.transpose(1, 2)).reshape(b, ch, h, w)) * (AB / (1 - AB))
        return x


@dataclass(frozen=True)
class MPConfig:
    """The U's shape (cpu32's by default); the same fields mean what they mean in model.unet.UNetConfig."""

    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    attn_res: tuple[int, ...] = (8,)
    enc_blocks: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attn_res", tuple(int(r) for r in self.attn_res))
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mult) - 1}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "MPConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown MP U-Net config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def like(cls, c: UNetConfig) -> "MPConfig":
        """The shape of a model.unet.UNetConfig (a teacher's)."""
        return cls(c.image_size, c.in_channels, c.base_channels, c.channel_mult, c.attn_resolutions, c.num_res_blocks)


class MPUNet(nn.Module):
    """The trained form: eps_theta's v (as cpu32) from x_t and t."""

    def __init__(self, alphas_cumprod: torch.Tensor, cfg: MPConfig = MPConfig(), sigma_data: float = 0.5):
        super().__init__()
        self.config = cfg
        ch = cfg.base_channels
        emb_ch = 4 * ch
        ac = alphas_cumprod.double()
        self.register_buffer("c_in", (1 / (ac * sigma_data ** 2 + 1 - ac).sqrt()).float(), persistent=False)
        self.emb_in = MPConv(ch, emb_ch, 0)
        self.conv_in = MPConv(cfg.in_channels, ch, 3)
        self.conv_in_bias = nn.Parameter(torch.zeros(ch))
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.enc, self.enc_plan = nn.ModuleList(), []
        skips, cur, res = [ch], ch, cfg.image_size
        for i, m in enumerate(cfg.channel_mult):
            if i:
                self.enc_plan.append("down")
                res //= 2
                skips.append(cur)
            for _ in range(cfg.enc_blocks):
                self.enc.append(Block(cur, ch * m, emb_ch, "enc", res in cfg.attn_res))
                self.enc_plan.append(len(self.enc) - 1)
                cur = ch * m
                skips.append(cur)
        self.mid = nn.ModuleList([Block(cur, cur, emb_ch, "dec", True), Block(cur, cur, emb_ch, "dec")])
        self.dec, self.dec_plan = nn.ModuleList(), []
        for i, m in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.enc_blocks + 1):
                self.dec.append(Block(cur + skips.pop(), ch * m, emb_ch, "dec", res in cfg.attn_res))
                self.dec_plan.append(len(self.dec) - 1)
                cur = ch * m
            if i:
                self.dec_plan.append("up")
                res *= 2
        self.conv_out = MPConv(cur, cfg.in_channels, 3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.emb_in(timestep_embedding(t, self.config.base_channels) * math.sqrt(2))) / MP_SILU
        h = self.conv_in(x * self.c_in[t.long()].reshape(-1, 1, 1, 1)) + self.conv_in_bias[:, None, None]
        return self.conv_out(levels(self, h, emb), gain=self.out_gain)


def levels(net: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The U: encoder (blocks, average-pool down), middle, decoder (blocks on the concatenated skip, nearest up)."""
    hs = [h]
    for p in net.enc_plan:
        h = F.avg_pool2d(h, 2) if p == "down" else net.enc[p](h, emb)
        hs.append(h)
    for blk in net.mid:
        h = blk(h, emb)
    for p in net.dec_plan:
        if p == "up":
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        else:
            h = net.dec[p](torch.cat([h, hs.pop()], 1), emb)
    return h


def plain_conv(w: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Conv2d:
    m = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], padding=w.shape[-1] // 2, bias=bias is not None)
    with torch.no_grad():
        m.weight.copy_(w)
        if bias is not None:
            m.bias.copy_(bias)
    return m


class BakedBlock(nn.Module):
    """A Block with its weight normalisation, MP scales, gains and attention scale folded into plain layers."""

    def __init__(self, b: Block):
        super().__init__()
        gs, gy = b.res_gains()
        self.enc_skip = b.enc_skip
        self.conv0 = plain_conv(b.conv_res0.w() / MP_SILU)
        we = b.emb_linear.w(b.emb_gain) / MP_SILU  # the embedding's MP-SiLU scale, and the +1
        self.emb = nn.Linear(we.shape[1], we.shape[0])
        with torch.no_grad():
            self.emb.weight.copy_(we)
            self.emb.bias.fill_(1.0)
        self.conv1 = plain_conv(b.conv_res1.w() * (gy / MP_SILU))
        self.skip = None
        if b.conv_skip is not None:
            self.skip = plain_conv(b.conv_skip.w() * (1.0 if self.enc_skip else gs))
        self.attn = b.attn_qkv is not None
        if self.attn:
            ch = b.attn_proj.weight.shape[0]
            w = b.attn_qkv.w().clone()
            w[:ch] /= math.sqrt(ch)
            self.qkv = plain_conv(w)
            self.proj = plain_conv(b.attn_proj.w() * (AB / (1 - AB)))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.enc_skip:
            x = self.skip(x)
        y = self.conv1(F.silu(self.conv0(F.silu(x)) * self.emb(emb)[:, :, None, None]))
        x = (self.skip(x) if self.skip is not None and not self.enc_skip else x) + y
        if self.attn:
            b, ch, h, w = x.shape
            q, k, v = self.qkv(x).reshape(b, 3 * ch, h * w).split(ch, dim=1)
            a = torch.softmax(torch.matmul(q.transpose(1, 2), k), dim=-1)
            x = x + self.proj(torch.matmul(v, a.transpose(1, 2)).reshape(b, ch, h, w))
        return x


class Baked(nn.Module):
    """The same function as an MPUNet (to float rounding) in plain layers: what inference runs and exports."""

    def __init__(self, m: MPUNet):
        super().__init__()
        m = m.eval()
        self.config, self.enc_plan, self.dec_plan = m.config, m.enc_plan, m.dec_plan
        self.register_buffer("c_in", m.c_in.clone(), persistent=False)
        we = m.emb_in.w() * math.sqrt(2)
        self.emb_in = nn.Linear(we.shape[1], we.shape[0], bias=False)
        with torch.no_grad():
            self.emb_in.weight.copy_(we)
        self.conv_in = plain_conv(m.conv_in.w(), m.conv_in_bias.detach())
        self.enc = nn.ModuleList(BakedBlock(b) for b in m.enc)
        self.mid = nn.ModuleList(BakedBlock(b) for b in m.mid)
        self.dec = nn.ModuleList(BakedBlock(b) for b in m.dec)
        self.conv_out = plain_conv(m.conv_out.w(m.out_gain))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = F.silu(self.emb_in(timestep_embedding(t, self.config.base_channels)))
        h = self.conv_in(x * self.c_in[t.long()].reshape(-1, 1, 1, 1))
        return self.conv_out(levels(self, h, emb))
