"""Distil a U-Net's weights into an mp-unet (model/mp_unet.py), the network without GroupNorm for the batch-1 CPU step:
`python -m train.distill --data PATH --out RUN_DIR [--teacher WEIGHTS] [--steps N] [--init RUN_DIR | --resume]`.

The student learns the teacher's prediction at the student's own noised training images (x_t = sqrt(abar_t) x_0 +
sqrt(1 - abar_t) eps, t uniform), in the teacher's shape and schedule. `--loss` sets the space its error is measured
in: eps (each t weighted as the teacher was trained; most of the error then sits at small t, where it barely moves
an image) or v (each t weighted 1/abar_t more: the large t that set a face's layout count). `--chain-share` takes that
share of each batch from the states the student's own sampler visits instead (its EMA's default 1000-step ddpm
chains, `--chain-rows` of them, drawn again every `--chain-every` steps), where its errors have compounded: the
teacher's prediction there is what the student should have said (DAgger's idea). Adam (0.9, 0.99), 100
warm-up steps and cosine decay from --lr, EMA 0.999. `--init` starts from another run's weights with a new warm-up,
schedule and optimizer; `--resume` continues this run (optimizer and RNG state included).

RUN_DIR gets ckpt.pt (as train.train's: weights, EMA, optimizer, step, RNG; loaded with weights_only=True) and
metrics.jsonl; `python -m train.export RUN_DIR --out weights/NAME.safetensors` writes the EMA weights for serving.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.diffusion import Diffusion
from model.mp_unet import Baked, MPConfig, MPUNet
from model.weights import DEFAULT_WEIGHTS, WeightsError, load_weights

from .data import DataError, load_images, mirror, to_model_range
from .train import ema_update, load_checkpoint, save_checkpoint

EMA_DECAY = 0.999


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CelebA images: a folder or tar of JPEG/PNG files")
    p.add_argument("--out", required=True, help="run folder (ckpt.pt, metrics.jsonl)")
    p.add_argument("--teacher", default=str(DEFAULT_WEIGHTS), help="the U-Net weights to distil (.safetensors)")
    p.add_argument("--range", dest="range_", default="1-8000", help="training images (keep FID's images out)")
    p.add_argument("--steps", type=int, default=6000, help="steps of this run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--loss", choices=("eps", "v"), default="v")
    p.add_argument("--chain-share", type=float, default=0.0,
                   help="share of each batch from the student's own 1000-step ddpm chains (0: noised images only)")
    p.add_argument("--chain-rows", type=int, default=64, help="chains drawn at a time (each gives T states)")
    p.add_argument("--chain-every", type=int, default=1000, help="steps between drawing new chains")
    p.add_argument("--init", default=None, help="start from this distillation run folder's weights")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (the same --steps: its schedule)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@torch.no_grad()
def chain_states(student: MPUNet, diffusion: Diffusion, rows: int, generator: torch.Generator) -> torch.Tensor:
    """(T, rows, C, H, W): x_t at every t of `rows` default 1000-step ddpm chains of the student (baked), the
    states its sampler visits; x_t enters the step at t (row k of the coefficient table is t = T-1-k)."""
    net, cfg = Baked(copy.deepcopy(student)), student.config
    table = diffusion.coefficients("ddpm", diffusion.T).float()
    x = torch.randn(rows, cfg.in_channels, cfg.image_size, cfg.image_size, generator=generator)
    states = torch.empty(diffusion.T, *x.shape)
    for t, a, b, c, *_ in table.tolist():
        states[int(t)] = x
        x = a * x + b * net(x, torch.full((rows,), t))
        if c:
            x += c * torch.randn(x.shape, generator=generator)
    return states


def distill_loss(student, teacher, diffusion: Diffusion, x_t: torch.Tensor, t: torch.Tensor, space: str):
    """Mean squared difference of the two predictions at the same x_t, in eps or v (both nets predict the
    schedule's `prediction`; eps = sqrt(abar) v + sqrt(1-abar) x_t, so an error in v is sqrt(abar) times one in
    eps)."""
    alpha = diffusion._sqrt_tables(x_t.device)[0][t].view(-1, 1, 1, 1)
    with torch.no_grad():
        target = teacher(x_t, t.float())
    out = student(x_t, t.float())
    v_prediction = diffusion.config.prediction == "v"
    if (space == "v") == v_prediction:
        return F.mse_loss(out, target)
    scale = alpha if v_prediction else 1 / alpha  # v -> eps, or eps -> v
    return F.mse_loss(out * scale, target * scale)


def lr_at(i: int, steps: int, lr: float) -> float:
    return lr * min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / steps))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    n_chain = round(a.batch_size * a.chain_share)  # rows of each batch from the student's chains
    if not 0 <= a.chain_share < 1 or (a.chain_share and not n_chain) or a.chain_rows < 1 or a.chain_every < 1:
        raise SystemExit("error: --chain-share must be in [0, 1) (some of each batch stays noised images) and, if "
                         "not 0, at least one row of --batch-size; --chain-rows and --chain-every at least 1")
    if a.resume and a.init:
        raise SystemExit("error: --resume continues --out's own run; --init starts a new one: give one of them")
    out, previous = Path(a.out), None
    ckpt_path = out / "ckpt.pt"
    try:
        w = load_weights(a.teacher)
    except WeightsError as e:
        raise SystemExit(f"error: --teacher: {e}")
    if a.resume or a.init:
        path = ckpt_path if a.resume else Path(a.init) / "ckpt.pt"
        if not path.is_file():
            raise SystemExit(f"error: {'--resume' if a.resume else '--init'}: {path} does not exist")
        previous = load_checkpoint(path)
        if previous["teacher_sha256"] != w.sha256:
            raise SystemExit(f"error: {path} was distilled from other weights than {a.teacher}")
    teacher, diffusion = w.unet.eval().requires_grad_(False), w.diffusion
    cfg = MPConfig.like(teacher.config)
    try:
        data = load_images(a.data, cfg.image_size, range_=a.range_, min_images=a.batch_size,
                           progress=not a.no_progress)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    torch.manual_seed(a.seed)
    model = MPUNet(diffusion.alphas_cumprod, cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, betas=(0.9, 0.99))
    start, first = 0, 0  # the run's first step, and the step this process starts at
    command = "python -m train.distill " + shlex.join(argv if argv is not None else sys.argv[1:])
    history = [{"command": command}]
    if previous is not None:
        model.load_state_dict(previous["model"])
        ema.load_state_dict(previous["ema"])
        history = json.loads(previous["meta"])["history"] + history
        first = int(previous["step"])
        start = int(previous["run_start"]) if a.resume else first
        if a.resume:
            opt.load_state_dict(previous["optimizer"])
            torch.set_rng_state(previous["rng_cpu"])
    history[-1]["from_step"] = first
    meta = {"teacher": str(a.teacher), "data": str(a.data), "range": a.range_, "images": len(data.names),
            "loss": a.loss, "batch_size": a.batch_size, "lr": a.lr, "ema_decay": EMA_DECAY, "history": history}
    if a.chain_share:
        meta.update(chain_share=a.chain_share, chain_rows=a.chain_rows, chain_every=a.chain_every)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "a")

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                        step=step, run_start=start, rng_cpu=torch.get_rng_state(), architecture="mp-unet",
                        unet_config=json.dumps(cfg.to_dict()), schedule=json.dumps(diffusion.config.to_dict()),
                        teacher_sha256=w.sha256, meta=json.dumps(meta))

    states = None
    t0, running = time.time(), None
    bar = tqdm(range(first, start + a.steps), initial=first - start, total=a.steps, desc="distil", unit="step",
               disable=a.no_progress)
    for step in bar:
        lr = lr_at(step - start, a.steps, a.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        if n_chain and (states is None or (step - start) % a.chain_every == 0):
            draw = (step - start) // a.chain_every  # a resume mid-interval draws from the EMA it resumes with
            states = chain_states(ema, diffusion, a.chain_rows, torch.Generator().manual_seed(a.seed * 7919 + draw))
        n = a.batch_size - n_chain
        x0 = to_model_range(data.images[torch.randint(0, len(data.images), (n,))])
        x0 = mirror(x0, torch.rand(n) < 0.5)
        t = torch.randint(0, diffusion.T, (n,))
        x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
        if n_chain:
            t_chain = torch.randint(0, diffusion.T, (n_chain,))
            x_chain = states[t_chain, torch.randint(0, a.chain_rows, (n_chain,))]
            x_chain = mirror(x_chain, torch.rand(n_chain) < 0.5)
            x_t, t = torch.cat([x_t, x_chain]), torch.cat([t, t_chain])
        loss = distill_loss(model, teacher, diffusion, x_t, t, a.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, model, step, EMA_DECAY)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        done = step + 1
        if done % 50 == 0 or done == start + a.steps:
            rec = {"step": done, "loss": round(running, 6), "lr": lr, "elapsed_s": round(time.time() - t0, 1)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{running:.5f}")
        if done % a.checkpoint_every == 0 or done == start + a.steps:
            checkpoint(done)
    log.close()
    print(f"{out}: {start + a.steps} steps; `python -m train.export {out} --out weights/NAME.safetensors` to serve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
