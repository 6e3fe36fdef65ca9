import json

import pytest
import torch

from model.diffusers_compat import from_diffusers_folder, main, to_diffusers
from model.unet import PRESETS, UNet, UNetConfig
from model.weights import load_weights

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'celeba-ddpm[bench]')")

CONFIGS = [PRESETS["tiny"], PRESETS["cpu32"],
           UNetConfig(image_size=16, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2,
                      attn_resolutions=(16, 4), dropout=0.0, num_groups=8)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tiny", "cpu32", "attn-everywhere"])
def test_diffusers_unet_computes_the_same_function(cfg):
    torch.manual_seed(0)
    ours = UNet(cfg).eval()
    theirs = to_diffusers(ours)
    x, t = torch.randn(3, 3, cfg.image_size, cfg.image_size), torch.tensor([0, 417, 999])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t).sample
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max()


def test_diffusers_folder_round_trip(tmp_path):
    torch.manual_seed(1)
    ours = UNet(PRESETS["tiny"]).eval()
    pipe_dir = tmp_path / "ddpm-tiny"
    to_diffusers(ours).save_pretrained(pipe_dir / "unet", safe_serialization=True)
    (pipe_dir / "scheduler").mkdir()
    (pipe_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}))
    back, sched = from_diffusers_folder(pipe_dir)
    assert back.config == ours.config and sched.kind == "linear"
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert main([str(pipe_dir), "--out", str(tmp_path / "w.safetensors")]) == 0
    assert load_weights(tmp_path / "w.safetensors").unet.config == ours.config
    (pipe_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="only safetensors"):
        from_diffusers_folder(pipe_dir)
