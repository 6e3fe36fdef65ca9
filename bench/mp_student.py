"""A network without GroupNorm for the batch-1 CPU step (issue 21): cpu32's U-Net shape rebuilt as a
magnitude-preserving network after EDM2 (Karras et al. 2024), trained as a student of cpu32, and its constants folded
into plain convolutions for inference. An experiment, not a shipped model: this file holds all of it.

    python bench/mp_student.py train --steps 7000 --out runs/mp-student.pt            # ~1 h on 2 cores
    python bench/mp_student.py evaluate runs/mp-student.pt --n 1000                   # FID as cpu32's was measured
    python bench/mp_student.py time runs/mp-student.pt --rounds 5 --out bench/results/mp-student-cpu.md

Why: on 2 cores the batch-1 forward of cpu32 is bound by the number of graph nodes ONNX Runtime runs, and its 27
GroupNorms (six nodes each) are what a graph without them saves (docs/cpu-latency.md); cpu32 distilled into a graph
with the norms simply left out lost its faces. EDM2's recipe keeps activations at unit scale without normalising
them: every conv and linear row is held at unit norm (forced weight normalisation) and each layer's output is
scaled by constants so that unit-variance inputs give unit-variance outputs (MP-SiLU, MP sums). Here those
constants sit where they fold into the next or previous convolution (`Baked`), so at inference the graph is
convolutions, SiLUs, the residual adds (which ONNX Runtime fuses into the convolutions), the attention and one
multiply per block for the time conditioning. Differences from EDM2: no pixel norm in the encoder, plain
concatenation of the skips, residuals x + g y (g fixed) where the skip is the identity, a conv bias on the input
instead of a constant channel, the VP schedule's input scale c_in(t) = 1/sqrt(alphabar_t sd^2 + 1 - alphabar_t),
the timestep's sinusoidal embedding. Trained on cpu32's eps at the same noised training images (mean squared error in
eps, as cpu32 was trained), Adam (0.9, 0.99), lr 1e-2 with 100 warm-up steps and cosine decay, EMA 0.999.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from model.unet import timestep_embedding  # noqa: E402
from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from data_loading import TAR as DATA  # noqa: E402  (bench/data_loading.py: the shared CelebA tar)
from report import command, emit  # noqa: E402

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
class MPConfig:  # cpu32's shape by default
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    attn_res: tuple[int, ...] = (8,)
    enc_blocks: int = 1

    @classmethod
    def like(cls, unet_config) -> "MPConfig":
        """The shape of a model.unet.UNetConfig (the teacher's)."""
        c = unet_config
        return cls(c.image_size, c.in_channels, c.base_channels, tuple(c.channel_mult), tuple(c.attn_resolutions),
                   c.num_res_blocks)


class MPUNet(nn.Module):
    """The trained form: eps_theta's v (as cpu32) from x_t and t."""

    def __init__(self, alphas_cumprod: torch.Tensor, cfg: MPConfig = MPConfig(), sigma_data: float = 0.5):
        super().__init__()
        self.config = cfg
        ch = cfg.base_channels
        emb_ch = 4 * ch
        ac = alphas_cumprod.double()
        self.register_buffer("c_in", (1 / (ac * sigma_data ** 2 + 1 - ac).sqrt()).float())
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
        self.register_buffer("c_in", m.c_in.clone())
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


def load_student(path: str, alphas_cumprod: torch.Tensor) -> Baked:
    """A train checkpoint's EMA weights, baked."""
    ckpt = torch.load(path, weights_only=True)
    m = MPUNet(alphas_cumprod, MPConfig(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in ckpt["config"].items()}))
    m.load_state_dict(ckpt["ema"])
    return Baked(m).eval()


def train(a) -> None:
    """Distil cpu32 (the teacher's eps at the student's x_t and t) into an MPUNet; checkpoints hold both weights."""
    from train.data import load_images, to_model_range
    from train.train import ema_update

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    w = load_weights(a.weights)
    teacher, diffusion = w.unet.eval(), w.diffusion
    images = load_images(a.data, teacher.config.image_size, range_=a.range).images
    cfg = MPConfig.like(teacher.config)
    model = MPUNet(diffusion.alphas_cumprod, cfg).train()
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.99))
    sqrt_ab, sqrt_1mab = diffusion._sqrt_tables("cpu")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    log, t0, running = open(Path(a.out).with_suffix(".jsonl"), "w"), time.time(), 0.0
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = to_model_range(images[torch.randint(0, len(images), (a.batch_size,))])
        x0 = torch.where((torch.rand(a.batch_size) < 0.5)[:, None, None, None], x0.flip(3), x0)
        t = torch.randint(0, diffusion.T, (a.batch_size,))
        alpha, sigma = sqrt_ab[t].view(-1, 1, 1, 1), sqrt_1mab[t].view(-1, 1, 1, 1)
        x_t = alpha * x0 + sigma * torch.randn_like(x0)
        with torch.no_grad():
            target = sigma * x_t + alpha * teacher(x_t, t.float())  # eps from the teacher's v
        loss = F.mse_loss(sigma * x_t + alpha * model(x_t, t.float()), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, step, 0.999)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        last = step == a.steps - 1
        if step % 50 == 0 or last:
            rec = {"step": step, "loss": round(running, 5), "lr": lr, "elapsed_s": round(time.time() - t0, 1)}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if (step and step % 500 == 0) or last:
            torch.save({"ema": ema.state_dict(), "model": model.state_dict(), "step": step,
                        "config": dataclasses.asdict(cfg)}, a.out)


def evaluate(a) -> None:
    """FID, KID and face share of the student (or, with --teacher, cpu32) as train.evaluate measures weights."""
    from model.engine import SamplerEngine, generate
    from train.evaluate import DEFAULT_CACHE, real_features
    from train.fid import face_share, fid_from_features, inception_features, kid_from_features, load_inception

    w = load_weights(a.weights)
    unet = w.unet if a.teacher else load_student(a.ckpt, w.diffusion.alphas_cumprod)
    net = load_inception("cpu")
    real, real_share, _ = real_features(a.data, "8001-9000", unet.config.image_size, a.n, net, "cpu", DEFAULT_CACHE)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as cache:
        engine = SamplerEngine(unet, w.diffusion, "cpu", torch.float32, runner="onnx", cache_dir=Path(cache))
        gen = generate(engine, list(range(a.n)), a.sampler, a.steps, 100)
    seconds = time.time() - t0
    if a.grid:
        from model.images import grid, png_bytes

        Path(a.grid).write_bytes(png_bytes(grid(gen[:16], 4)))
    feats = inception_features(gen, net, "cpu")
    kid, _ = kid_from_features(feats, real)
    result = {"model": "cpu32" if a.teacher else a.ckpt, "sampler": a.sampler, "steps": a.steps, "n": a.n,
              "fid": round(fid_from_features(feats, real), 2), "kid": round(kid, 5),
              "face_share": round(face_share(gen), 4), "face_share_real": round(real_share, 4),
              "generate_seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d %H:%M")}
    emit([f"- `{command(__file__)}`: `{json.dumps(result)}`"], a.out, append=True)


def timing(a) -> None:
    """cpu32 and the baked student side by side: ORT graph nodes, the batch-1 forward (bench/runner.py's interleaved
    timer), and the 1000-step ddpm chain at batch 1 through the engine (chained steps), with and without spinning."""
    import onnxruntime as ort

    from cheaper_networks import optimized_nodes
    from model.engine import SamplerEngine, generate
    from model.runner_onnx import export
    from runner import time_interleaved
    from runner_profile import as_fn, session

    w = load_weights(a.weights)
    teacher, student = f"teacher, {Path(a.weights).name}", "MP student (baked)"
    nets = {teacher: w.unet.eval(), student: load_student(a.ckpt, w.diffusion.alphas_cumprod)}
    options = ((2, True), (1, False))  # (ORT intra-op threads, spinning): SPIN_THREADS and the service's default
    rows, chains, fns = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, net) in enumerate(nets.items()):
            path = Path(tmp) / f"{i}.onnx"
            export(net, path)
            rows[name] = {"nodes": optimized_nodes(path)}
            for threads, spin in options:
                fns[(name, threads, spin)] = as_fn(session(path, threads, spin))
        c = w.unet.config
        x, t = torch.randn(1, c.in_channels, c.image_size, c.image_size), torch.tensor([500.0])
        with torch.inference_mode():  # the timer checks the teacher's graphs against the teacher; this, the student's
            for threads, spin in options:
                torch.testing.assert_close(fns[(student, threads, spin)](x, t), nets[student](x, t), rtol=1e-4,
                                           atol=1e-4)
        labels = {f"{name}, {threads} thread(s)": (name, threads, spin) for name, threads, spin in fns}
        [(_, timed)] = time_interleaved({label: fns[key] for label, key in labels.items()}, nets[teacher], [1],
                                        a.rounds * 3, a.min_seconds,
                                        unchecked=frozenset(k for k, v in labels.items() if v[0] == student))
        for label, (name, threads, spin) in labels.items():
            rows[name][(threads, spin)] = timed[label]
        for spin in (True, False):
            engines = {k: SamplerEngine(v, w.diffusion, "cpu", torch.float32, runner="onnx", cache_dir=Path(tmp),
                                        spin=spin) for k, v in nets.items()}
            for e in engines.values():
                generate(e, [7], "ddpm", 20, 1)  # build the chain sessions
            runs = {k: [] for k in engines}
            for _ in range(a.rounds):
                for k, e in engines.items():
                    t0 = time.perf_counter()
                    generate(e, [7], "ddpm", a.chain_steps, 1)
                    runs[k].append(time.perf_counter() - t0)
            for k, v in runs.items():
                chains[(k, spin)] = (min(v), statistics.median(v))
    lines = ["# A network without GroupNorm: cpu32 beside its MP student (bench/mp_student.py)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}, machine: {platform.machine()}, {os.cpu_count()} cores, "
             f"torch {torch.__version__}, onnxruntime {ort.__version__}",
             f"- command: `{command(__file__)}`",
             f"- student: {a.ckpt}", "",
             f"ms per batch-1 forward, best (median) of {a.rounds * 3} interleaved rounds of ~{a.min_seconds} s; "
             "seconds for "
             f"the {a.chain_steps}-step ddpm chain at batch 1 through the engine (10 chained steps per ORT call), "
             f"best (median) of {a.rounds} interleaved runs:", "",
             "| network | ORT nodes | forward, 2 threads spinning | forward, 1 thread | chain, SPIN_THREADS | chain, "
             "default |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        cells = [f"{r[k][0]:.2f} ({r[k][1]:.2f})" for k in ((2, True), (1, False))]
        cells += [f"{chains[(name, s)][0]:.2f} ({chains[(name, s)][1]:.2f})" for s in (True, False)]
        lines.append(f"| {name} | {r['nodes']} | " + " | ".join(cells) + " |")
    emit(lines, a.out, append=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("--steps", type=int, default=7000)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=1e-2)
    tr.add_argument("--threads", type=int, default=2)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--range", default="1-8000", help="training images (8001-9000 are held out for FID)")
    tr.add_argument("--out", required=True, help="checkpoint (.pt, weights only); its log beside it (.jsonl)")
    ev = sub.add_parser("evaluate")
    ev.add_argument("ckpt")
    ev.add_argument("--teacher", action="store_true", help="evaluate cpu32 instead, the same way")
    ev.add_argument("--n", type=int, default=1000)
    ev.add_argument("--sampler", default="dpm-solver++")
    ev.add_argument("--steps", type=int, default=50)
    ev.add_argument("--grid", default=None, help="also write the first 16 images as a 4x4 PNG here")
    ev.add_argument("--out", default=None, help="add the result line to this results file")
    tm = sub.add_parser("time")
    tm.add_argument("ckpt")
    tm.add_argument("--rounds", type=int, default=5)
    tm.add_argument("--chain-steps", type=int, default=1000)
    tm.add_argument("--min-seconds", type=float, default=0.3, help="per graph per forward round")
    tm.add_argument("--out", default=None)
    for s in (tr, ev, tm):
        s.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="the teacher (cpu32)")
        s.add_argument("--data", default=str(DATA))
    a = p.parse_args(argv)
    {"train": train, "evaluate": evaluate, "time": timing}[a.cmd](a)


if __name__ == "__main__":
    main()
