"""Conversion between this project's U-Net and diffusers' UNet2DModel (same DDPM architecture).

`to_diffusers(unet)` builds an equivalent UNet2DModel, or for an mp-unet model/diffusers_mp.py's MPUNet2DModel (for
benchmarks against DDPMPipeline on the same weights);
`from_diffusers_folder(path)` reads a diffusers DDPM checkpoint folder that users already have on disk (e.g. a
copy of google/ddpm-celebahq-256: config.json and diffusion_pytorch_model.safetensors; pickled .bin files are
refused) into a UNet and schedule. CLI: `python -m model.diffusers_compat DIR --out W.safetensors`.
diffusers is an optional dependency (`pip install 'celeba-ddpm[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from .diffusion import ScheduleConfig
from .mp_unet import Baked
from .unet import UNet, UNetConfig
from .weights import save_weights


def diffusers_config(cfg: UNetConfig) -> dict:
    levels = len(cfg.channel_mult)
    res = [cfg.image_size // 2**i for i in range(levels)]
    attn = [r in cfg.attn_resolutions for r in res]
    return dict(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=cfg.num_res_blocks, norm_num_groups=cfg.num_groups, dropout=cfg.dropout,
        attention_head_dim=None, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
        time_embedding_type="positional", center_input_sample=False, act_fn="silu",
    )


def _resblock_map(ours: str, theirs: str) -> list[tuple[str, str]]:
    names = [("norm1", "norm1"), ("conv1", "conv1"), ("temb_proj", "time_emb_proj"), ("norm2", "norm2"),
             ("conv2", "conv2"), ("shortcut", "conv_shortcut")]
    return [(f"{ours}.{a}", f"{theirs}.{b}") for a, b in names]


def key_map(cfg: UNetConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(plain renames, attention blocks) as (our prefix, diffusers prefix) pairs."""
    plain = [("temb.0", "time_embedding.linear_1"), ("temb.2", "time_embedding.linear_2"),
             ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")]
    attns = []
    levels = len(cfg.channel_mult)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            plain += _resblock_map(f"down.{i}.blocks.{j}", f"down_blocks.{i}.resnets.{j}")
            attns.append((f"down.{i}.attns.{j}", f"down_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            plain.append((f"down.{i}.resample.conv", f"down_blocks.{i}.downsamplers.0.conv"))
    plain += _resblock_map("mid1", "mid_block.resnets.0") + _resblock_map("mid2", "mid_block.resnets.1")
    attns.append(("mid_attn", "mid_block.attentions.0"))
    for i in range(levels):
        for j in range(cfg.num_res_blocks + 1):
            plain += _resblock_map(f"up.{i}.blocks.{j}", f"up_blocks.{i}.resnets.{j}")
            attns.append((f"up.{i}.attns.{j}", f"up_blocks.{i}.attentions.{j}"))
        if i < levels - 1:
            plain.append((f"up.{i}.resample.conv", f"up_blocks.{i}.upsamplers.0.conv"))
    return plain, attns


def _rename(state: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Weights and biases of each (source prefix, destination prefix) pair present in `state`, renamed."""
    return {f"{dst}.{suffix}": state[f"{src}.{suffix}"]
            for src, dst in pairs for suffix in ("weight", "bias") if f"{src}.{suffix}" in state}


def ours_to_diffusers_state(unet: UNet) -> dict[str, torch.Tensor]:
    sd = unet.state_dict()
    plain, attns = key_map(unet.config)
    out = _rename(sd, plain)
    for a, b in attns:
        if f"{a}.qkv.weight" not in sd:
            continue  # no attention at this resolution
        c = sd[f"{a}.proj.weight"].shape[0]
        qw, kw, vw = sd[f"{a}.qkv.weight"].reshape(3, c, c)
        qb, kb, vb = sd[f"{a}.qkv.bias"].reshape(3, c)
        out.update({f"{b}.group_norm.weight": sd[f"{a}.norm.weight"], f"{b}.group_norm.bias": sd[f"{a}.norm.bias"],
                    f"{b}.to_q.weight": qw, f"{b}.to_q.bias": qb, f"{b}.to_k.weight": kw, f"{b}.to_k.bias": kb,
                    f"{b}.to_v.weight": vw, f"{b}.to_v.bias": vb,
                    f"{b}.to_out.0.weight": sd[f"{a}.proj.weight"].reshape(c, c),
                    f"{b}.to_out.0.bias": sd[f"{a}.proj.bias"]})
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_ours_state(state: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    plain, attns = key_map(cfg)
    out = _rename(state, [(b, a) for a, b in plain])
    for a, b in attns:
        if f"{b}.to_q.weight" not in state:
            continue
        c = state[f"{b}.to_q.weight"].shape[0]
        out[f"{a}.norm.weight"], out[f"{a}.norm.bias"] = state[f"{b}.group_norm.weight"], state[f"{b}.group_norm.bias"]
        out[f"{a}.qkv.weight"] = torch.cat([state[f"{b}.to_{x}.weight"] for x in "qkv"]).reshape(3 * c, c, 1, 1)
        out[f"{a}.qkv.bias"] = torch.cat([state[f"{b}.to_{x}.bias"] for x in "qkv"])
        out[f"{a}.proj.weight"] = state[f"{b}.to_out.0.weight"].reshape(c, c, 1, 1)
        out[f"{a}.proj.bias"] = state[f"{b}.to_out.0.bias"]
    return out


def to_diffusers(unet, schedule: ScheduleConfig | None = None):
    """The diffusers model computing the same function: UNet2DModel for a U-Net; for an mp-unet (baked, as
    load_weights gives it) model/diffusers_mp.py's MPUNet2DModel, which needs the `schedule` it scales its input by."""
    from diffusers import UNet2DModel

    if isinstance(unet, UNet):
        model = UNet2DModel(**diffusers_config(unet.config))
        model.load_state_dict(ours_to_diffusers_state(unet), strict=True)
        return model.eval()
    if isinstance(unet, Baked):
        if schedule is None:
            raise ValueError("an mp-unet scales its input by its schedule's alphabar_t: pass schedule=")
        from .diffusers_mp import MPUNet2DModel

        return MPUNet2DModel.from_baked(unet, schedule)
    raise ValueError(f"{type(unet).__name__} has no diffusers equivalent: UNet2DModel is the DDPM U-Net "
                     "(model/unet.py), MPUNet2DModel the baked mp-unet (model/mp_unet.py's Baked)")


PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}  # ours -> diffusers' prediction_type


def diffusers_scheduler(schedule: ScheduleConfig):
    """diffusers' DDPMScheduler running our default sampler: sigma_t = sqrt(beta_t), no clipping."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=schedule.num_timesteps, beta_start=schedule.beta_start,
                         beta_end=schedule.beta_end,
                         beta_schedule="linear" if schedule.kind == "linear" else "squaredcos_cap_v2",
                         variance_type="fixed_large", clip_sample=False,
                         prediction_type=PREDICTION_TYPES[schedule.prediction])


def config_from_diffusers(d: dict) -> UNetConfig:
    """Our config for a diffusers UNet2DModel config, or ValueError naming what can't be mapped."""
    need = {"freq_shift": 1, "flip_sin_to_cos": False, "downsample_padding": 0, "time_embedding_type": "positional",
            "center_input_sample": False, "act_fn": "silu", "resnet_time_scale_shift": "default"}
    for k, v in need.items():
        if d.get(k, v) != v:
            raise ValueError(f"unsupported diffusers config: {k}={d.get(k)!r} (this architecture needs {v!r})")
    chans = list(d["block_out_channels"])
    base = chans[0]
    size = d["sample_size"] if isinstance(d["sample_size"], int) else d["sample_size"][0]
    attn_res = tuple(size // 2**i for i, t in enumerate(d["down_block_types"]) if t == "AttnDownBlock2D")
    for t in d["down_block_types"]:
        if t not in ("AttnDownBlock2D", "DownBlock2D"):
            raise ValueError(f"unsupported diffusers down block {t!r}")
    if d.get("attention_head_dim") not in (None,) + tuple(chans):
        raise ValueError("unsupported diffusers config: multi-head attention (attention_head_dim)")
    return UNetConfig(image_size=size, in_channels=d.get("in_channels", 3), base_channels=base,
                      channel_mult=tuple(c // base for c in chans), num_res_blocks=d["layers_per_block"],
                      attn_resolutions=attn_res, dropout=d.get("dropout", 0.0), num_groups=d.get("norm_num_groups", 32))


SOURCE_SCHEDULER_KEYS = ("_class_name", "variance_type", "clip_sample", "clip_sample_range", "prediction_type",
                         "beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "thresholding")


def scheduler_notes(source: dict) -> list[str]:
    """What differs between a checkpoint's own scheduler and this project's samplers, in words."""
    notes = []
    if source.get("variance_type", "fixed_small") == "fixed_small":
        notes.append("its scheduler samples with the posterior variance (variance_type=fixed_small): request "
                     "sampler 'ddpm-posterior' for that; 'ddpm' uses sigma_t = sqrt(beta_t)")
    if source.get("clip_sample", True):
        notes.append("its scheduler clips each x0 estimate to [-1, 1] (clip_sample=true); these samplers do not "
                     "clip (the exact reverse process)")
    return notes


def read_source_scheduler(path: str | Path) -> dict | None:
    """The scheduler settings a diffusers checkpoint folder ships (scheduler/scheduler_config.json), if any."""
    path = Path(path)
    for f in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if f.is_file():
            s = json.loads(f.read_text())
            return {k: s[k] for k in SOURCE_SCHEDULER_KEYS if k in s}
    return None


def from_diffusers_folder(path: str | Path) -> tuple[UNet, ScheduleConfig]:
    from safetensors.torch import load_file

    path = Path(path)
    unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    cfg_file, weights = unet_dir / "config.json", unet_dir / "diffusion_pytorch_model.safetensors"
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no config.json (is it a diffusers UNet2DModel folder?)")
    if not weights.is_file():
        raise ValueError(f"{weights}: missing; only safetensors checkpoints are read (pickled .bin files are not)")
    cfg = config_from_diffusers(json.loads(cfg_file.read_text()))
    unet = UNet(cfg)
    unet.load_state_dict(diffusers_to_ours_state(load_file(str(weights)), cfg), strict=True)
    sched = ScheduleConfig()
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        sched_file = path / "scheduler_config.json"
    if sched_file.is_file():
        s = json.loads(sched_file.read_text())
        kind = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(s.get("beta_schedule", "linear"))
        if kind is None:
            raise ValueError(f"{sched_file}: unsupported beta_schedule {s.get('beta_schedule')!r}")
        prediction = {v: k for k, v in PREDICTION_TYPES.items()}.get(s.get("prediction_type", "epsilon"))
        if prediction is None:
            raise ValueError(f"{sched_file}: unsupported prediction_type {s.get('prediction_type')!r} "
                             f"(expected {' or '.join(PREDICTION_TYPES.values())})")
        sched = ScheduleConfig(kind=kind, num_timesteps=s.get("num_train_timesteps", 1000),
                               beta_start=s.get("beta_start", 1e-4), beta_end=s.get("beta_end", 0.02),
                               prediction=prediction)
    return unet.eval(), sched


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.diffusers_compat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a diffusers DDPM pipeline or UNet2DModel folder")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="fp32", choices=["fp16", "fp32"])
    a = p.parse_args(argv)
    try:
        unet, sched = from_diffusers_folder(a.folder)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(a.folder).resolve().name)
    source = read_source_scheduler(a.folder)
    save_weights(a.out, unet, sched, name=name, dataset=f"converted from diffusers checkpoint {a.folder}",
                 training_steps=0, training={"converted_from": str(a.folder)},
                 dtype=torch.float16 if a.dtype == "fp16" else torch.float32,
                 extra={"source_scheduler": source} if source is not None else None)
    print(f"wrote {a.out}: {unet.config.image_size}x{unet.config.image_size}, "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters ({a.dtype})")
    for note in scheduler_notes(source or {}):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
