"""Train the DDPM U-Net: `python -m train --data PATH --preset NAME --out RUN_DIR [--steps N] [--resume]`.

One process (CPU or one GPU) or many under torchrun (DistributedDataParallel; rank 0 logs and checkpoints).
Every random draw of step s (batch order, flips, t, eps) is made for the whole global batch from generators seeded
by (seed, s), each rank taking its slice, so the number of processes does not change what is trained (up to float
summation order, in fp32; bf16's rounding also depends on the batch split; dropout masks are drawn per rank, from
(seed, s, rank)). On a 2-core CPU, two single-threaded processes train faster than one with two threads
(bench/results/train-step-cpu.md): `torchrun --nproc_per_node 2 -m train ... --device cpu`.
`--resume` continues exactly on CPU: 20 steps + resume + 20 steps gives the weights of 40 straight. On CUDA that
holds within a tolerance (cuDNN picks kernels by shape, some backward kernels use atomics) unless
`--deterministic` is given.

RUN_DIR gets: ckpt.pt (weights, EMA, optimizer, step, RNG states; written atomically, loaded with
weights_only=True), metrics.jsonl, samples/step_NNNNNN.png (EMA weights), and TensorBoard logs when installed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from model.diffusion import (LOSS_WEIGHTINGS, PREDICTIONS, SAMPLERS, TIMESTEP_SAMPLINGS, Diffusion, Objective,
                             ScheduleConfig)
from model.device import pick_device, pick_memory_format
from model.engine import SamplerEngine, generate
from model.images import grid, png_bytes
from model.unet import PRESETS, UNet, UNetConfig
from model.weights import WeightsError, load_weights

from .data import DataError, add_source_arguments, load_sources, mirror, to_model_range


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p)
    p.add_argument("--framing", default="auto", choices=["auto", "celeba", "center"],
                   help="the square crop of each photo (train/data.py; auto: celeba for CelebA's aspect ratio)")
    p.add_argument("--preset", default="cpu32", choices=sorted(PRESETS), help="U-Net size (model/unet.py PRESETS)")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="the betas over T = 1000 steps")
    p.add_argument("--prediction", default="v", choices=list(PREDICTIONS),
                   help="network output: v (default; learns high-noise steps reliably) or eps (Ho et al.); "
                        "both are sampled as eps predictors, see model/diffusion.py")
    p.add_argument("--loss-weight", default="eps", choices=LOSS_WEIGHTINGS,
                   help="per-timestep weight of the eps loss: eps (Ho et al.), min-snr, edm (model/diffusion.py "
                        "Objective)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-snr's gamma")
    p.add_argument("--t-sampling", default="uniform", choices=TIMESTEP_SAMPLINGS,
                   help="how t is drawn: uniform over 0..T-1, or edm (log-normal noise levels)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these .safetensors weights (architecture included) instead of random ones")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--steps", type=int, default=10000, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split across processes)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW's peak learning rate")
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="after warm-up: constant, or cosine decay to 0 at --steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this")
    p.add_argument("--ema-decay", type=float, default=0.9999,
                   help="decay of the weights' moving average (what samples and exports use)")
    p.add_argument("--ema-std", type=float, default=None, metavar="SIGMA_REL",
                   help="instead of --ema-decay: EDM2's power-function EMA of this relative width (e.g. 0.05-0.15), "
                        "an average over the last SIGMA_REL-ish share of training at any length")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and every draw of every step")
    p.add_argument("--log-every", type=int, default=50, help="steps between lines of metrics.jsonl")
    p.add_argument("--sample-every", type=int, default=2000, help="steps between sample grids in samples/")
    p.add_argument("--sample-sampler", default="ddim", choices=SAMPLERS, help="sampler for those grids")
    p.add_argument("--sample-steps", type=int, default=50, help="its steps")
    p.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints (RUN_DIR/ckpt.pt)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="stop (and checkpoint) after this many seconds, checked at log steps")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                   help="auto: channels_last for fp32 on the CPU, else contiguous (model/device.py)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms: bitwise-repeatable runs on CUDA, slower")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the step's autocast (weights, optimizer and EMA stay fp32); auto: bf16 on CUDA and on a CPU "
                        "with AVX512_BF16 or AMX, else fp32 (bench/results/train-step-cpu.md)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs)")
    a = p.parse_args(argv)
    for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.ema_std is not None and not 0 < a.ema_std < SIGMA_REL_MAX:
        p.error(f"--ema-std must be in (0, {SIGMA_REL_MAX:.3f})")
    try:
        a.objective = Objective(a.loss_weight, a.t_sampling, min_snr_gamma=a.min_snr_gamma)
    except ValueError as e:
        p.error(str(e))
    return a


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _gen(device, *parts: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def resolve_device(name: str, env=os.environ) -> torch.device:
    """The training device, always with an index (torch.cuda.set_device and NCCL need one): under torchrun
    'auto'/'cuda' is cuda:LOCAL_RANK, alone it is pick_device's choice (cuda:0 unless CUDA_VISIBLE_DEVICES says)."""
    distributed = "RANK" in env and "WORLD_SIZE" in env
    if distributed and name in ("auto", "cuda") and torch.cuda.is_available():
        return pick_device(f"cuda:{int(env.get('LOCAL_RANK', 0))}")
    return pick_device(name)


class ShardedOrder:
    """Epoch-wise shuffled order over N images; step s on rank r takes its slice of the global batch.
    The permutations live on `device`, so a step's indices are slices of them: no host-device copy per step."""

    def __init__(self, n: int, seed: int, global_batch: int, rank: int, world: int, device="cpu"):
        self.n, self.seed, self.gb, self.rank, self.world = n, seed, global_batch, rank, world
        self.device = torch.device(device)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a step spans at most a few epochs: keep the recent ones
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            perm = torch.randperm(self.n, generator=_gen("cpu", self.seed, epoch, -1))
            self._perms[epoch] = perm.to(self.device)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        per_rank = self.gb // self.world
        first = step * self.gb + self.rank * per_rank  # global positions first .. first + per_rank - 1
        end = first + per_rank
        parts = []
        for epoch in range(first // self.n, (end - 1) // self.n + 1):
            lo, hi = max(first, epoch * self.n), min(end, (epoch + 1) * self.n)
            parts.append(self._perm(epoch)[lo - epoch * self.n:hi - epoch * self.n])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def lr_at(step: int, a) -> float:
    if a.warmup > 0 and step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    if a.lr_schedule == "cosine":
        progress = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return a.lr


SIGMA_REL_MAX = math.sqrt(1 / 12)  # the power-function EMA's widest profile (gamma = 0, a plain running mean)


def power_ema_gamma(sigma_rel: float) -> float:
    """EDM2's exponent gamma for a relative width sigma_rel (Karras et al. 2024, eq. 3): the average of theta_tau
    weighted by tau^gamma over 0 <= tau <= t has relative std sqrt((g+1) / ((g+2)^2 (g+3)))."""
    def width(g: float) -> float:
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))
    lo, hi = 0.0, 1e7
    for _ in range(200):  # width decreases in gamma: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if width(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def ema_decay_at(step: int, decay: float, gamma: float | None = None) -> float:
    """The EMA's decay after optimizer step `step` (0-based): (1 - 1/(step+1))^(gamma+1) for the power function,
    else `decay` with a warm-up that averages quickly at first."""
    if gamma is not None:
        return (1 - 1 / (step + 1)) ** (gamma + 1)
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float,
               gamma: float | None = None) -> None:
    d = ema_decay_at(step, decay, gamma)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in model.parameters()], 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX), where autocast pays (train-step-cpu.md)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in text.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """--precision's auto: bf16 on CUDA and on a CPU with native bf16, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"


def training_memory_format(name: str, device: torch.device, precision: str) -> torch.memory_format:
    """--memory-format for training: auto is contiguous for bf16 (faster on the CPU, bench/results/train-step-cpu.md)
    and otherwise pick_memory_format's choice (channels_last for fp32 on the CPU, contiguous on CUDA)."""
    if name == "auto" and resolve_precision(precision, device) == "bf16":
        return torch.contiguous_format
    return pick_memory_format(name, device)


def autocast(device: torch.device, precision: str = "auto"):
    """The training step's autocast: bf16 or fp32 (weights, optimizer and EMA stay fp32 either way)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")


def optimizer_step(fwd, model, ema, opt, diffusion, x0, t, eps, amp, grad_clip: float, step: int, ema_decay: float,
                   weights: torch.Tensor | None = None, ema_gamma: float | None = None):
    """One training step: the eps loss under `amp` (each row weighted by `weights[t]` when given), backward,
    clipping, the optimizer and the EMA. `fwd` is what the loss calls (the model, or its DDP/compiled wrapper);
    returns (loss, gradient norm), both on the device."""
    with amp:
        loss = diffusion.training_loss(fwd, x0, t, eps, weights=weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    ema_update(ema, model, step, ema_decay, ema_gamma)
    return loss, gnorm


def save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one, never half of one


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def main(argv=None) -> int:
    a = parse_args(argv)
    # ---- processes and device: one, or one per GPU under torchrun ------------------------------------------------
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if distributed else (0, 1)
    try:
        device = resolve_device(a.device)
        precision = resolve_precision(a.precision, device)
        memory_format = training_memory_format(a.memory_format, device, precision)
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if a.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for repeatable results
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if distributed:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)  # binds the process group to this GPU at once
        else:
            dist.init_process_group("gloo")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.batch_size % world:
        raise SystemExit(f"error: --batch-size {a.batch_size} is not divisible by {world} processes")
    is_main = rank == 0
    out = Path(a.out)
    ckpt_path = out / "ckpt.pt"

    # ---- what to train: the architecture and schedule from --preset, --init's weights or --resume's checkpoint ---
    start_step, resumed, init = 0, None, None
    if a.init and not a.resume:
        try:
            init = load_weights(a.init)
        except WeightsError as e:
            raise SystemExit(f"error: --init: {e}")
        if not isinstance(init.unet, UNet):
            raise SystemExit(f"error: --init: {a.init} holds an {init.metadata['architecture']}, not a U-Net "
                             "(`python -m train.distill --init RUN_DIR` continues a distillation run)")
    cfg = init.unet.config if init is not None else PRESETS[a.preset]  # --init brings its architecture
    if a.dropout is not None:
        cfg = UNetConfig.from_dict({**cfg.to_dict(), "dropout": a.dropout})
    schedule = ScheduleConfig(kind=a.schedule, prediction=a.prediction)
    if a.resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"error: --resume: {ckpt_path} does not exist")
        resumed = load_checkpoint(ckpt_path)
        cfg = UNetConfig.from_dict(json.loads(resumed["unet_config"]))
        schedule = ScheduleConfig.from_dict(json.loads(resumed["schedule"]))
        start_step = int(resumed["step"])

    # ---- data: decoded once into memory (train/data.py) ----------------------------------------------------------
    try:
        data = load_sources(a.sources, cfg.image_size, framing=a.framing, min_images=max(a.batch_size, 2),
                            progress=is_main and not a.no_progress)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        print(f"data: {len(data.names)} images from {data.source} at {cfg.image_size}x{cfg.image_size}"
              + (f", {len(data.skipped)} unreadable skipped (e.g. {data.skipped[0][0]})" if data.skipped else ""))

    # ---- model, EMA copy, optimizer ------------------------------------------------------------------------------
    diffusion = Diffusion(schedule)
    torch.manual_seed(a.seed)
    model = UNet(cfg).to(device).to(memory_format=memory_format)
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), weight_decay=a.weight_decay,
                            fused=device.type == "cuda")  # one kernel for all parameters on CUDA
    if init is not None:
        model.load_state_dict(init.unet.state_dict())
        ema.load_state_dict(init.unet.state_dict())
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        ema.load_state_dict(resumed["ema"])
        opt.load_state_dict(resumed["optimizer"])
        torch.set_rng_state(resumed["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in resumed:
            torch.cuda.set_rng_state(resumed["rng_cuda"])
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    fwd = torch.compile(net) if a.compile else net
    amp = autocast(device, precision)
    objective = a.objective
    # Ho et al.'s objective is the plain MSE (weights None), the very computation of earlier runs
    weights = None if objective.weighting == "eps" else diffusion.loss_weights(objective).to(device)
    t_probs = None if objective.t_sampling == "uniform" else diffusion.timestep_probs(objective).to(device)
    ema_gamma = power_ema_gamma(a.ema_std) if a.ema_std is not None else None
    images = data.images.to(device) if device.type == "cuda" else data.images
    order = ShardedOrder(len(data.names), a.seed, a.batch_size, rank, world, images.device)
    per_rank = a.batch_size // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's part of each global-batch draw

    # ---- run record: the commands behind these weights, metrics.jsonl, TensorBoard, checkpoints, samples ---------
    command = "python -m train " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    meta = {"command": command, "data": [{"path": s.path, "range": s.range_} for s in a.sources],
            "images": len(data.names),
            "preset": a.preset, "batch_size": a.batch_size, "lr": a.lr, "ema_decay": a.ema_decay,
            "ema_std": a.ema_std, "objective": dataclasses.asdict(objective), "precision": precision,
            "world_size": world, "device": str(device)}
    previous = json.loads(resumed["meta"]) if resumed is not None else {}
    if init is not None:  # the weights we start from, and the commands that made them
        before = json.loads(init.metadata.get("training", "{}"))
        previous = {"init": {"path": str(a.init), "sha256": init.sha256, "schedule": init.metadata["schedule"],
                             "training_steps": int(init.metadata["training_steps"])},
                    "history": before.get("history", [])}
    if "init" in previous:
        meta["init"] = previous["init"]
    # every command that contributed to these weights, with the step it started from
    meta["history"] = previous.get("history", []) + [{"command": command, "from_step": start_step}]
    tb = None
    if is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(out / "tb"))
        except Exception:  # TensorBoard is optional
            tb = None
    log = open(out / "metrics.jsonl", "a") if is_main else None

    def checkpoint(step: int) -> None:
        state = dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), step=step,
                     rng_cpu=torch.get_rng_state(), unet_config=json.dumps(cfg.to_dict()),
                     schedule=json.dumps(schedule.to_dict()), meta=json.dumps(meta))
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(ckpt_path, **state)

    def sample_grid(step: int) -> None:
        engine = SamplerEngine(copy.deepcopy(ema), diffusion, device, torch.float32)
        imgs = generate(engine, list(range(16)), a.sample_sampler, min(a.sample_steps, diffusion.T), 16)
        (out / "samples" / f"step_{step:06d}.png").write_bytes(png_bytes(grid(imgs, 4)))

    # ---- training loop -------------------------------------------------------------------------------------------
    t0, last_t, last_step = time.time(), time.time(), start_step
    loss_acc, loss_n = torch.zeros((), device=device), 0
    bar = tqdm(total=a.steps, initial=start_step, desc="train", unit="step",
               disable=not is_main or a.no_progress, dynamic_ncols=True)
    step = start_step
    net.train()
    while step < a.steps:
        # the draws for the whole global batch, from (seed, step): the same images whatever the world size
        g = _gen(device, a.seed, step)
        torch.manual_seed(derive_seed(a.seed, step, rank, 1))  # dropout draws
        x0 = to_model_range(images[order.indices(step)])
        global_shape = (a.batch_size, *x0.shape[1:])
        flip = (torch.rand(a.batch_size, device=device, generator=g) < 0.5)[mine]
        x0 = mirror(x0, flip).contiguous(memory_format=memory_format)
        if t_probs is None:
            t = torch.randint(0, diffusion.T, (a.batch_size,), device=device, generator=g)[mine]
        else:
            t = torch.multinomial(t_probs, a.batch_size, replacement=True, generator=g)[mine]
        eps = torch.randn(global_shape, device=device, generator=g)[mine]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a)
        loss, gnorm = optimizer_step(fwd, model, ema, opt, diffusion, x0, t, eps, amp, a.grad_clip, step, a.ema_decay,
                                     weights, ema_gamma)
        step += 1
        loss_acc += loss.detach()
        loss_n += 1
        bar.update(1)
        if step % a.log_every == 0 or step == a.steps:
            mean_loss = (loss_acc / loss_n).item()
            if distributed:
                lt = torch.tensor([mean_loss], device=device)
                dist.all_reduce(lt)
                mean_loss = lt.item() / world
            now = time.time()
            rate = (step - last_step) / max(now - last_t, 1e-9)
            if is_main:
                rec = {"step": step, "loss": round(mean_loss, 6), "lr": lr_at(step - 1, a),
                       "grad_norm": round(float(gnorm), 4), "steps_per_s": round(rate, 3),
                       "images_per_s": round(rate * a.batch_size, 1), "elapsed_s": round(now - t0, 1)}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{mean_loss:.4f}", it_s=f"{rate:.2f}")
                if tb is not None:
                    tb.add_scalar("loss", mean_loss, step)
                    tb.add_scalar("lr", rec["lr"], step)
            loss_acc.zero_()
            loss_n, last_t, last_step = 0, now, step
        out_of_time = False
        if a.time_budget is not None and (step % a.log_every == 0 or step == a.steps):  # DDP: a sync, so rarely
            out_of_time = time.time() - t0 > a.time_budget
            if distributed:  # every rank must agree to stop together
                flag = torch.tensor([float(out_of_time)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
        if is_main and (step % a.sample_every == 0 or step == a.steps or out_of_time):
            sample_grid(step)
        if is_main and (step % a.ckpt_every == 0 or step == a.steps or out_of_time):
            checkpoint(step)
        if out_of_time:
            break
    bar.close()
    # ---- end: check that the ranks hold the same weights, close the logs -----------------------------------------
    if distributed:
        vec = torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # channels_last: no .view
        ref = vec.clone()
        dist.broadcast(ref, 0)
        diff = (vec - ref).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if is_main:
            log.write(json.dumps({"step": step, "ranks_in_sync": bool(diff.item() == 0.0),
                                  "max_param_diff": float(diff)}) + "\n")
        dist.barrier()
        dist.destroy_process_group()
    if is_main:
        log.close()
        if tb is not None:
            tb.close()
        print(f"done: step {step}, checkpoint {ckpt_path}")
    return 0
