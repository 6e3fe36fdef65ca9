"""Which training recipe gives the best faces for the same compute? Short runs at a fixed budget of images seen (same
data, seed and batch), each judged by validation KID (images 008001-009000, n images, the same sampler), in one table.

    python bench/recipe.py --recipes today ho min-snr edm --steps 2800 --out bench/results/recipe-cpu.md

Each run trains with `torchrun --nproc_per_node 2 -m train` (two single-threaded processes: the fastest step on two
cores, bench/results/train-step-cpu.md) in RUN_ROOT/NAME, which lives outside the checkout (runs are stopped with the
session that started them): a stopped run resumes from its checkpoint when the command is given again, and a
finished one is only evaluated (once: its eval JSON is kept). KID is measured at --eval-at fractions of the budget,
so the table shows KID against images seen. Run it at low priority (`nice -n 19`) beside other work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import command, emit, stamp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "celeba"
TRAIN_DATA = ["--data", str(DATA / "img_align_celeba_89x109_000001-009000.tar"), "--range", "1-8000",
              "--data", str(DATA / "img_align_celeba_89x109_more_24477.tar")]
SMALL_DATA = TRAIN_DATA[:4]  # the 8,000 images every model before this one was trained on
# Each recipe: train.train's flags beyond the shared ones (data, preset, batch, steps, seed).
RECIPES: dict[str, tuple[str, list[str]]] = {
    "today": ("the shipped model's: v output, eps loss, uniform t, lr 2e-4, EMA 0.9999, dropout 0.1, 32,477 images",
              TRAIN_DATA),
    "today-8k": ("the same on 8,000 images (000001-008000)", SMALL_DATA),
    "ho": ("Ho et al.: eps output, eps loss, uniform t, constant lr 2e-4", TRAIN_DATA + ["--prediction", "eps"]),
    "min-snr": ("today's, with min-SNR-5 loss weights (Hang et al. 2023)", TRAIN_DATA + ["--loss-weight", "min-snr"]),
    "edm": ("today's, with EDM's loss weights and log-normal noise levels (Karras et al. 2022)",
            TRAIN_DATA + ["--loss-weight", "edm", "--t-sampling", "edm"]),
    "ema-power": ("today's, with EDM2's power-function EMA, sigma_rel 0.10", TRAIN_DATA + ["--ema-std", "0.1"]),
    "no-dropout": ("today's without dropout", TRAIN_DATA + ["--dropout", "0"]),
    "lr-4e-4": ("today's at lr 4e-4", TRAIN_DATA + ["--lr", "4e-4"]),
}


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run `cmd` in the checkout, its output added to `log`; exit with the log's name if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:6])} ... exited {r.returncode}; see {log}")


def checkpoint_step(out: Path) -> int | None:
    """The step of the run's checkpoint, None without one."""
    ckpt = out / "ckpt.pt"
    if not ckpt.is_file():
        return None
    import torch
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["step"])


def train(name: str, flags: list[str], a, steps: int) -> Path:
    out = Path(a.run_root) / name
    at = checkpoint_step(out)
    if at is not None and at >= steps:
        return out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train",
           *flags, "--preset", a.preset, "--batch-size", str(a.batch_size), "--steps", str(steps), "--seed", "0",
           "--out", str(out), "--device", "cpu", "--threads", "1", "--log-every", "50", "--ckpt-every", "200",
           "--sample-every", str(10**9), "--no-progress"] + (["--resume"] if at is not None else [])
    run(cmd, out / "train.log", env)
    return out


def evaluate(name: str, out: Path, steps: int, a) -> dict:
    result = out / f"eval-{steps}.json"
    if result.is_file():
        return json.loads(result.read_text())
    weights = out / f"step-{steps}.safetensors"
    if not weights.is_file():
        at = checkpoint_step(out)
        if at != steps:
            raise SystemExit(f"error: {out}: the checkpoint is at step {at}, not {steps}; it cannot be judged there")
        run([sys.executable, "-m", "train.export", str(out), "--out", str(weights), "--name", f"recipe-{name}"],
            out / "eval.log")
    run([sys.executable, "-m", "train.evaluate", "--weights", str(weights), "--data",
         str(DATA / "img_align_celeba_89x109_000001-009000.tar"), "--range", "8001-9000", "--n", str(a.n),
         "--sampler", "dpm-solver++", "--steps", "50", "--out", str(result)], out / "eval.log")
    return json.loads(result.read_text())


def train_seconds(log: list[dict], steps: int) -> float:
    """Seconds of training up to `steps` from metrics.jsonl: elapsed_s restarts with each resumed segment."""
    total, last = 0.0, 0.0
    for rec in (r for r in log if r["step"] <= steps):
        if rec["elapsed_s"] < last:  # a new segment
            total += last
        last = rec["elapsed_s"]
    return total + last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--preset", default="cpu32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=2800, help="the budget: optimizer steps of --batch-size images")
    p.add_argument("--eval-at", nargs="+", type=float, default=[0.5, 1.0], help="fractions of --steps to judge at")
    p.add_argument("--n", type=int, default=1000, help="generated and validation images for KID")
    p.add_argument("--run-root", default=str(Path.home() / ".cache" / "celeba-ddpm" / "runs" / "recipe"))
    p.add_argument("--out", default=None, help="results file (rewritten with every row so far)")
    a = p.parse_args(argv)

    header = ["# Training recipes at a fixed budget", "", stamp(),
              f"- command: `{command(__file__, argv)}`",
              f"- preset {a.preset}, global batch {a.batch_size}, seed 0, two single-threaded processes; KID (x1000, "
              f"mean ± std over subsets) of {a.n} images from dpm-solver++ 50 steps against validation "
              "008001-009000", "",
              "| recipe | what | images seen | KID x1000 | FID | face share | train s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for name in a.recipes:
        what, flags = RECIPES[name]
        for frac in sorted(a.eval_at):
            steps = max(1, round(a.steps * frac))
            t0 = time.time()
            out = train(name, flags, a, steps)
            log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"elapsed_s"' in x]
            r = evaluate(name, out, steps, a)
            rows.append(f"| {name} | {what} | {steps * a.batch_size:,} | {1000 * r['kid']:.1f} ± "
                        f"{1000 * r['kid_std']:.1f} | {r['fid']:.1f} | {r['face_share_generated']:.3f} | "
                        f"{train_seconds(log, steps):.0f} |")
            print(rows[-1], f"({time.time() - t0:.0f} s)", flush=True)
            emit(header + rows, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
