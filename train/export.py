"""Export a run's EMA weights for serving: `python -m train.export RUN_DIR --out weights/NAME.safetensors`.
RUN_DIR is a train.train run (a U-Net) or a train.distill run (an mp-unet)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model.diffusion import Diffusion, ScheduleConfig
from model.weights import build_network, save_weights

from .train import load_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__)
    p.add_argument("run_dir", help="a training run folder holding ckpt.pt")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--dtype", default="fp32", choices=["fp16", "fp32"])
    p.add_argument("--name", default=None, help="model name in the metadata (default: the output file's stem)")
    p.add_argument("--dataset", default=None, help="dataset description (default: from the run's metadata)")
    a = p.parse_args(argv)
    ckpt = Path(a.run_dir) / "ckpt.pt"
    if not ckpt.is_file():
        print(f"error: {ckpt}: no checkpoint (is {a.run_dir} a training run folder?)", file=sys.stderr)
        return 2
    try:
        state = load_checkpoint(ckpt)
    except Exception as e:  # torch raises several types for truncated or foreign files
        print(f"error: {ckpt}: cannot read checkpoint: {e}", file=sys.stderr)
        return 2
    schedule = ScheduleConfig.from_dict(json.loads(state["schedule"]))
    meta = json.loads(state.get("meta", "{}"))
    # train.train's checkpoints hold a U-Net; train.distill's say they hold an mp-unet
    unet = build_network(state.get("architecture", "unet"), json.loads(state["unet_config"]), Diffusion(schedule))
    unet.load_state_dict(state["ema"])
    # a distilled network names the weights it learned from by content (the path was the distiller's machine's)
    teacher = {"teacher_sha256": state["teacher_sha256"]} if "teacher_sha256" in state else {}
    dataset = a.dataset or describe_data(meta)
    save_weights(a.out, unet, schedule,
                 name=a.name or Path(a.out).stem, dataset=dataset,
                 training_steps=int(state["step"]) + int(meta.get("init", {}).get("training_steps", 0)),
                 training={**meta, **teacher, "ema": True}, dtype=torch.float16 if a.dtype == "fp16" else torch.float32)
    print(f"wrote {a.out}: EMA weights at step {int(state['step'])} ({a.dtype})")
    return 0


def describe_data(meta: dict) -> str:
    """The run's training data in words: each source with its image numbers (train.train records a list of
    {path, range}; train.distill and older runs one path and one range)."""
    data = meta.get("data")
    sources = data if isinstance(data, list) else [{"path": data, "range": meta.get("range")}]
    listed = "; ".join(f"{s['path']}, images {s.get('range') or 'all'}" for s in sources)
    return f"CelebA img_align_celeba ({listed})"


if __name__ == "__main__":
    sys.exit(main())
