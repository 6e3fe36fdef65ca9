"""Self-describing weights: a safetensors file whose header metadata holds everything needed to rebuild the model.

Metadata (all strings, as safetensors requires): format, name, unet_config (JSON), schedule (JSON), image_size,
dataset, training_steps, code_version and, optionally, training (JSON: command, data range, ...) and architecture:
"unet" (model/unet.py, the default when absent) or "mp-unet" (model/mp_unet.py: its trained form is stored, and
loading returns it baked into plain layers).
Loading needs nothing else, and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .diffusion import Diffusion, ScheduleConfig
from .mp_unet import Baked, MPConfig, MPUNet
from .unet import UNet, UNetConfig

FORMAT = "celeba-ddpm.unet/1"
ARCHITECTURES = {"unet": UNetConfig, "mp-unet": MPConfig}
REQUIRED = ("format", "unet_config", "schedule", "image_size", "dataset", "training_steps", "code_version")
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "celeba32-cpu.safetensors"  # CPU: 32x32
# 64x64, trained for 200 s on an H200 (bench/results/gpu-run-h200.md); too slow for a CPU at 1000 steps
GPU_WEIGHTS = DEFAULT_WEIGHTS.with_name("celeba-h200-64.safetensors")


def default_weights(device: torch.device) -> Path:
    """The shipped weights for a device: the 64x64 model on a GPU, the small 32x32 one on CPU."""
    return GPU_WEIGHTS if device.type == "cuda" else DEFAULT_WEIGHTS


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass
class LoadedWeights:
    unet: UNet | Baked
    diffusion: Diffusion
    metadata: dict[str, str]
    sha256: str
    path: str

    @property
    def name(self) -> str:
        return self.metadata.get("name") or Path(self.path).stem


def save_weights(path: str | os.PathLike, unet: UNet | MPUNet, schedule: ScheduleConfig, *, name: str, dataset: str,
                 training_steps: int, training: dict | None = None, dtype: torch.dtype = torch.float32,
                 extra: dict[str, dict] | None = None) -> None:
    """Write `unet`'s weights (cast to `dtype`) with self-describing metadata, atomically (write, then rename).
    extra: further metadata entries, stored as JSON (e.g. a converted checkpoint's source_scheduler)."""
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "name": name,
        "unet_config": json.dumps(unet.config.to_dict()),
        "schedule": json.dumps(schedule.to_dict()),
        "image_size": str(unet.config.image_size),
        "dataset": dataset,
        "training_steps": str(int(training_steps)),
        "code_version": __version__,
    }
    if isinstance(unet, MPUNet):
        metadata["architecture"] = "mp-unet"
    if training is not None:
        metadata["training"] = json.dumps(training)
    for key, value in (extra or {}).items():
        metadata[key] = json.dumps(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o644)  # readable by a service running as another user
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata, validated; raises WeightsError naming the file and the problem."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(path, "no such file")
    if not p.is_file():
        raise WeightsError(path, "not a regular file")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(path, f"not a readable safetensors file (truncated or another format?): {e}") from None
    missing = [k for k in REQUIRED if k not in metadata]
    if missing:
        raise WeightsError(path, f"safetensors metadata lacks {', '.join(missing)}; "
                                 "was it written by `python -m train.export`?")
    if metadata["format"] != FORMAT:
        raise WeightsError(path, f"metadata format is {metadata['format']!r}, expected {FORMAT!r}")
    return metadata


def build_network(architecture: str, config: dict, diffusion: Diffusion) -> UNet | MPUNet:
    """An untrained network of `architecture` ("unet" or "mp-unet") from its config as stored in unet_config; an
    mp-unet in its trained form, which scales its input by the schedule."""
    cfg = ARCHITECTURES[architecture].from_dict(config)
    return UNet(cfg) if architecture == "unet" else MPUNet(diffusion.alphas_cumprod, cfg)


def load_weights(path: str | os.PathLike = DEFAULT_WEIGHTS, device: str | torch.device = "cpu") -> LoadedWeights:
    metadata = read_metadata(path)
    arch = metadata.get("architecture", "unet")
    if arch not in ARCHITECTURES:
        raise WeightsError(path, f"unknown architecture {arch!r} (this version knows {', '.join(ARCHITECTURES)})")
    try:
        diffusion = Diffusion(ScheduleConfig.from_dict(json.loads(metadata["schedule"])))
        net = build_network(arch, json.loads(metadata["unet_config"]), diffusion)
    except (ValueError, TypeError) as e:
        raise WeightsError(path, f"bad architecture or schedule in metadata: {e}") from None
    if int(metadata["image_size"]) != net.config.image_size:
        raise WeightsError(path, f"metadata image_size {metadata['image_size']} != unet_config's "
                                 f"{net.config.image_size}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(path, f"cannot read tensors (truncated file?): {e}") from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(path, f"tensors don't match the config: missing {missing[:5]}"
                                 f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                 f"{'...' if len(unexpected) > 5 else ''}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise WeightsError(path, f"tensor {k} has shape {tuple(tensors[k].shape)}, "
                                     f"the config needs {tuple(v.shape)}")
        if not tensors[k].is_floating_point():
            raise WeightsError(path, f"tensor {k} has dtype {tensors[k].dtype}, expected floating point")
    net.load_state_dict({k: v.float() for k, v in tensors.items()})
    unet = net.eval() if arch == "unet" else Baked(net)
    return LoadedWeights(unet.to(device), diffusion, metadata, file_sha256(path), str(path))
