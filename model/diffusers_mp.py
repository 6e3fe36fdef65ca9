"""The mp-unet (model/mp_unet.py) as a diffusers model, so DDPMPipeline can run the same weights.

diffusers has no class for this architecture; a custom one is a `ModelMixin, ConfigMixin` whose forward takes
(sample, timestep) and returns `.sample`, which is all DDPMPipeline asks of its unet. It holds the baked form (what
our runner runs; the trained form gives the same outputs, slower) and its config holds the shape and the schedule
(the network scales its input by the schedule's alphabar_t), so `save_pretrained` / `from_pretrained` round-trip
without this project's weights format. Imported by `model.diffusers_compat.to_diffusers` only (diffusers is optional).
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from .diffusion import Diffusion, ScheduleConfig
from .mp_unet import Baked, MPConfig, MPUNet


class MPUNet2DModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, base_channels: int = 16,
                 channel_mult: tuple[int, ...] = (1, 2, 4), attn_res: tuple[int, ...] = (8,), enc_blocks: int = 1,
                 schedule: dict | None = None):
        super().__init__()
        cfg = MPConfig(sample_size, in_channels, base_channels, channel_mult, attn_res, enc_blocks)
        diffusion = Diffusion(ScheduleConfig.from_dict(schedule or {}))
        self.net = Baked(MPUNet(diffusion.alphas_cumprod, cfg))

    @classmethod
    def from_baked(cls, baked: Baked, schedule: ScheduleConfig) -> "MPUNet2DModel":
        c = baked.config
        model = cls(c.image_size, c.in_channels, c.base_channels, c.channel_mult, c.attn_res, c.enc_blocks,
                    schedule.to_dict())
        model.net.load_state_dict(baked.state_dict(), strict=True)
        return model.eval()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        out = self.net(sample, t.float())
        return UNet2DOutput(sample=out) if return_dict else (out,)
