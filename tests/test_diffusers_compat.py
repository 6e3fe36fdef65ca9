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


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusers_scheduler_agrees_with_our_tables(prediction):
    """diffusers' DDPMScheduler (with prediction_type from our schedule) makes the same x0 estimate at every t
    and the same final step as our coefficient tables, for eps- and v-networks alike."""
    from model.diffusers_compat import diffusers_scheduler
    from model.diffusion import Diffusion, ScheduleConfig

    d = Diffusion(ScheduleConfig(prediction=prediction))
    sched = diffusers_scheduler(d.config)
    sched.set_timesteps(1000)
    table = d.coefficients("ddpm", 1000)
    torch.manual_seed(0)
    x, out = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for k in (0, 500, 900, 999):  # table row k is t = 999 - k
        t = int(table[k, 0])
        step = sched.step(out, t, x, generator=torch.Generator().manual_seed(0))
        e, f = float(table[k, 5]), float(table[k, 6])
        assert torch.allclose(step.pred_original_sample, e * x + f * out, rtol=1e-5, atol=1e-4), t  # float32 alphas
        if t == 0:  # no noise at the last step: the whole update must agree
            a, b = float(table[k, 1]), float(table[k, 2])
            assert torch.allclose(step.prev_sample, a * x + b * out, rtol=1e-5, atol=1e-4)


def test_diffusers_prediction_type_is_read_and_checked(tmp_path):
    torch.manual_seed(1)
    pipe_dir = tmp_path / "ddpm-v"
    to_diffusers(UNet(PRESETS["tiny"]).eval()).save_pretrained(pipe_dir / "unet", safe_serialization=True)
    (pipe_dir / "scheduler").mkdir()
    cfg = pipe_dir / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({"beta_schedule": "linear", "prediction_type": "v_prediction"}))
    assert from_diffusers_folder(pipe_dir)[1].prediction == "v"
    cfg.write_text(json.dumps({"beta_schedule": "linear", "prediction_type": "sample"}))
    with pytest.raises(ValueError, match="unsupported prediction_type 'sample'"):
        from_diffusers_folder(pipe_dir)
