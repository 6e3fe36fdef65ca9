import json

import numpy as np
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


def test_posterior_variance_sampler_is_diffusers_fixed_small_step_by_step():
    """sampler 'ddpm-posterior' is DDPMScheduler(variance_type='fixed_small', clip_sample=False): the same update,
    noise included, at every one of the 1000 steps."""
    from diffusers import DDPMScheduler

    from model.diffusion import Diffusion

    d = Diffusion()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          variance_type="fixed_small", clip_sample=False)
    sched.set_timesteps(1000)
    table = d.coefficients("ddpm-posterior", 1000)
    assert not torch.equal(table[:, 3], d.coefficients("ddpm", 1000)[:, 3])  # a different sigma than ddpm's
    g = torch.Generator().manual_seed(0)
    for k in range(1000):
        t, a, b, c = int(table[k, 0]), *(float(v) for v in table[k, 1:4])
        x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
        theirs = sched.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(k)) if t > 0 else 0
        torch.testing.assert_close(theirs, a * x + b * eps + c * z, rtol=1e-4, atol=1e-4, msg=f"t={t}")


# The published configurations of Google's DDPM checkpoints (google/ddpm-celebahq-256, -church-256, -bedroom-256
# and -cat-256 share one; google/ddpm-cifar10-32), and the scheduler they ship.
PUBLISHED = {
    "ddpm-celebahq-256": dict(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                              down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4),
    "ddpm-cifar10-32": dict(sample_size=32, block_out_channels=(128, 256, 256, 256),
                            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
}
COMMON = dict(in_channels=3, out_channels=3, layers_per_block=2, attention_head_dim=None, norm_num_groups=32,
              norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu",
              center_input_sample=False, time_embedding_type="positional", mid_block_scale_factor=1)
GOOGLE_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                    "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
                    "variance_type": "fixed_small"}


def _published_folder(tmp_path, name):
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**PUBLISHED[name], **COMMON).eval()
    folder = tmp_path / name
    model.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(GOOGLE_SCHEDULER))
    return model, folder


@pytest.mark.parametrize("name", ["ddpm-cifar10-32", "ddpm-celebahq-256"])
def test_published_google_configurations_convert_and_compute_the_same(tmp_path, name, capsys):
    theirs, folder = _published_folder(tmp_path, name)
    assert main([str(folder), "--out", str(tmp_path / "w.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "ddpm-posterior" in printed and "clip_sample" in printed  # what differs from its own scheduler
    w = load_weights(tmp_path / "w.safetensors")
    assert json.loads(w.metadata["source_scheduler"])["variance_type"] == "fixed_small"
    size = PUBLISHED[name]["sample_size"]
    x, t = torch.randn(1, 3, size, size), torch.tensor([417])
    with torch.no_grad():
        a, b = w.unet(x, t), theirs(x, t).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    if name == "ddpm-celebahq-256":
        assert abs(sum(p.numel() for p in w.unet.parameters()) - 113.7e6) < 0.1e6
        assert main([str(folder), "--out", str(tmp_path / "h.safetensors"), "--dtype", "fp16"]) == 0
        half = load_weights(tmp_path / "h.safetensors")
        assert (tmp_path / "h.safetensors").stat().st_size < 0.51 * (tmp_path / "w.safetensors").stat().st_size
        for k, v in w.unet.state_dict().items():  # fp16 within fp16's precision
            torch.testing.assert_close(half.unet.state_dict()[k], v, rtol=1e-3, atol=1e-4)


def test_the_service_serves_a_converted_256_checkpoint(tmp_path):
    """End to end on CPU with a random-weight 256x256 model of Google's configuration: one ddim step each."""
    import httpx

    from service.settings import Settings

    from service_helpers import decode_png, running

    _, folder = _published_folder(tmp_path, "ddpm-celebahq-256")
    assert main([str(folder), "--out", str(tmp_path / "celebahq.safetensors")]) == 0
    settings = Settings(weights=tmp_path / "celebahq.safetensors", warmup=False, max_batch=2, runner="eager")
    with running(settings) as (url, _):
        info = httpx.get(url + "/v1/model").json()
        assert info["resolution"] == 256 and info["source_scheduler"]["clip_sample"] is True
        assert "ddpm-posterior" in info["samplers"]
        r = httpx.post(url + "/generate", json={"n": 2, "seed": 3, "steps": 1, "sampler": "ddim"}, timeout=300,
                       headers={"Accept": "image/png"})
        pixels, text = decode_png(r.content)
        assert r.status_code == 200 and pixels.shape == (2 + 258, 2 + 2 * 258, 3) and text["seeds"] == "3-4"
        assert text["model"] == "ddpm-celebahq-256" and len(text["weights_sha256"]) == 64


def test_diffusers_runs_an_mp_unet_on_the_same_weights(tmp_path):
    """DDPMPipeline takes a baked mp-unet as MPUNet2DModel (model/diffusers_mp.py): the same outputs as ours for a
    batch of timesteps or one scalar timestep (as DDPMPipeline passes it), a pipeline folder that diffusers' own
    from_pretrained reads back to the same images, and clear errors without the schedule or for other modules."""
    from conftest import mp_unet_like_trained
    from diffusers import DDPMPipeline, DiffusionPipeline

    from model.diffusers_compat import diffusers_scheduler
    from model.diffusion import ScheduleConfig
    from model.mp_unet import Baked, MPConfig

    schedule = ScheduleConfig(prediction="v")
    ours = Baked(mp_unet_like_trained(MPConfig.like(PRESETS["tiny"])))
    theirs = to_diffusers(ours, schedule)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 417, 999])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t).sample, ours(x, t.float()), rtol=0, atol=0)
        torch.testing.assert_close(theirs(x, torch.tensor(417)).sample, ours(x, torch.full((3,), 417.0)),
                                   rtol=0, atol=0)
    pipe = DDPMPipeline(unet=theirs, scheduler=diffusers_scheduler(schedule))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "pipe")
    back = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    back.set_progress_bar_config(disable=True)
    assert type(back.unet).__name__ == "MPUNet2DModel" and back.unet.config.schedule["prediction"] == "v"
    images = [p(batch_size=2, num_inference_steps=20, generator=torch.Generator().manual_seed(3), output_type="np")
              .images for p in (pipe, back)]
    assert images[0].shape == (2, 8, 8, 3) and np.isfinite(images[0]).all()
    np.testing.assert_array_equal(images[0], images[1])
    with pytest.raises(ValueError, match="pass schedule="):
        to_diffusers(ours)
    with pytest.raises(ValueError, match="no diffusers equivalent"):
        to_diffusers(torch.nn.Linear(2, 2))
