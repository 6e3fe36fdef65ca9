"""The mp-unet (model/mp_unet.py): its baked form computes the trained one, its weights describe themselves and load
baked, the runner compiles it, and train.distill makes such weights from a U-Net's (exported by train.export)."""

import json

import numpy as np
import pytest
import torch

from conftest import mp_unet_like_trained, needs_celeba
from model.diffusion import Diffusion, ScheduleConfig
from model.engine import SamplerEngine, generate
from model.mp_unet import Baked, MPConfig
from model.runner import ModelRunner
from model.unet import PRESETS
from model.weights import WeightsError, load_weights, save_weights
from train import distill, export

TINY = MPConfig.like(PRESETS["tiny"])


@pytest.mark.parametrize("cfg", [MPConfig(), TINY], ids=["cpu32", "tiny"])
def test_baked_is_the_trained_network(cfg):
    """Weight normalisation, MP scales, gains and the attention scale folded into plain layers: the same function at
    every timestep, and nothing left to train."""
    m = mp_unet_like_trained(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([999.0, 500.0, 0.0])
    with torch.no_grad():
        ref = m(x, t)
        torch.testing.assert_close(Baked(m)(x, t), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert not any(p.requires_grad for p in Baked(m).parameters())


def test_weights_record_the_architecture_and_load_baked(tmp_path):
    m = mp_unet_like_trained(TINY)
    path = tmp_path / "mp.safetensors"
    save_weights(path, m, ScheduleConfig(prediction="v"), name="mp", dataset="random (tests)", training_steps=1)
    w = load_weights(path)
    assert w.metadata["architecture"] == "mp-unet" and json.loads(w.metadata["unet_config"]) == TINY.to_dict()
    assert isinstance(w.unet, Baked) and w.unet.config == TINY and w.diffusion.config.prediction == "v"
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(w.unet(x, t), Baked(m)(x, t))
    # a file naming an architecture this version does not know, or tensors for another shape: named errors
    meta = dict(w.metadata, architecture="transformer")
    from safetensors.torch import load_file, save_file

    save_file(load_file(path), tmp_path / "other.safetensors", metadata=meta)
    with pytest.raises(WeightsError, match="unknown architecture 'transformer'"):
        load_weights(tmp_path / "other.safetensors")
    wide = MPConfig.from_dict({**TINY.to_dict(), "base_channels": 32})
    save_file(load_file(path), tmp_path / "wide.safetensors",
              metadata=dict(w.metadata, unet_config=json.dumps(wide.to_dict())))
    with pytest.raises(WeightsError, match="has shape"):
        load_weights(tmp_path / "wide.safetensors")


def test_runner_compiles_it(tmp_path):
    """auto picks ONNX Runtime for the baked network as for the U-Net: same outputs at every batch size (static and
    dynamic sessions)."""
    net = Baked(mp_unet_like_trained(TINY))
    runner = ModelRunner(net, torch.device("cpu"), torch.float32, cache_dir=tmp_path)
    assert runner.mode == "onnx"
    with torch.inference_mode():
        for b in (1, 3, 9):
            x, t = torch.randn(b, 3, 8, 8), torch.randint(0, 1000, (b,)).float()
            torch.testing.assert_close(runner(x, t), net(x, t), rtol=1e-5, atol=1e-5)
    runner.close()


def test_the_service_serves_mp_unet_weights(tmp_path):
    """The service takes an mp-unet weights file as it takes a U-Net's: ONNX Runtime runs it, /v1/model says which
    architecture, and the PNG for a seed is the offline engine's."""
    import httpx
    from service_helpers import decode_png, running

    from service.settings import Settings

    path = tmp_path / "mp.safetensors"
    save_weights(path, mp_unet_like_trained(TINY), ScheduleConfig(prediction="v"), name="mp-test",
                 dataset="random (tests)", training_steps=0)
    with running(Settings(weights=path, max_batch=4)) as (url, _):
        info = httpx.get(url + "/v1/model").json()
        assert info["architecture"] == {"kind": "mp-unet", **TINY.to_dict()} and info["runner"] == "onnx"
        r = httpx.post(url + "/generate", json={"n": 2, "seed": 5, "steps": 20}, timeout=120)
        assert r.status_code == 200, r.text
        pixels = [decode_png(im["png"])[0] for im in r.json()["images"]]
    w = load_weights(path)
    expected = generate(SamplerEngine(w.unet, w.diffusion, cache_dir=tmp_path / "onnx"), [5, 6], "ddpm", 20)
    assert all(np.array_equal(p, e) for p, e in zip(pixels, expected))


def test_train_train_refuses_mp_weights_as_a_start_and_distill_a_double_start(tmp_path):
    from train.train import main as train_main

    with pytest.raises(SystemExit, match="give one of them"):
        distill.main(["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--resume", "--init", str(tmp_path)])
    path = tmp_path / "mp.safetensors"
    save_weights(path, mp_unet_like_trained(TINY), ScheduleConfig(), name="mp", dataset="random (tests)",
                 training_steps=0)
    with pytest.raises(SystemExit, match="holds an mp-unet, not a U-Net"):
        train_main(["--data", str(tmp_path), "--out", str(tmp_path / "run"), "--init", str(path)])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_distill_loss_spaces_differ_by_the_schedule_weight(prediction):
    """An error in v is sqrt(abar_t) times the error in eps: at one t the two losses differ by abar_t exactly."""
    d = Diffusion(ScheduleConfig(prediction=prediction))
    torch.manual_seed(0)
    student, teacher = mp_unet_like_trained(TINY, 1), Baked(mp_unet_like_trained(TINY, 2))
    x_t, t = torch.randn(4, 3, 8, 8), torch.full((4,), 700)
    losses = {space: distill.distill_loss(student, teacher, d, x_t, t, space).item() for space in ("eps", "v")}
    assert losses["eps"] == pytest.approx(float(d.alphas_cumprod[700]) * losses["v"], rel=1e-4)


@needs_celeba()
def test_distill_resume_init_export_and_serve(tiny_weights, celeba_tar, tmp_path, capsys):
    """A few steps from the tiny teacher; --resume continues a run killed after its checkpoint at step 2 to the
    weights of 4 straight steps; --init
    starts a new run from its weights; train.export writes weights that load as an mp-unet and generate the same
    image for a seed whatever shares its batch."""
    run, args = tmp_path / "run", ["--teacher", str(tiny_weights), "--data", str(celeba_tar), "--range", "1-64",
                                   "--batch-size", "4", "--no-progress"]
    class Killed(Exception):
        pass

    def killed_after_first(path, **state):  # the process dies right after its first checkpoint
        save(path, **state)
        raise Killed

    save, distill.save_checkpoint = distill.save_checkpoint, killed_after_first
    try:
        with pytest.raises(Killed):
            distill.main(args + ["--out", str(run), "--steps", "4", "--checkpoint-every", "2"])
    finally:
        distill.save_checkpoint = save
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["architecture"] == "mp-unet"
    assert distill.main(args + ["--out", str(run), "--steps", "4", "--resume"]) == 0
    resumed = torch.load(run / "ckpt.pt", weights_only=True)
    assert distill.main(args + ["--out", str(tmp_path / "straight"), "--steps", "4"]) == 0
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 4 and all(torch.equal(resumed["ema"][k], v) for k, v in straight["ema"].items())
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [4]
    more = tmp_path / "more"
    assert distill.main(args + ["--out", str(more), "--steps", "2", "--init", str(run), "--loss", "eps"]) == 0
    state = torch.load(more / "ckpt.pt", weights_only=True)
    history = json.loads(state["meta"])["history"]
    assert state["step"] == 6 and [h["from_step"] for h in history] == [0, 2, 4]
    with pytest.raises(SystemExit, match="does not exist"):
        distill.main(args + ["--out", str(tmp_path / "none"), "--steps", "2", "--resume"])
    out = tmp_path / "mp.safetensors"
    assert export.main([str(more), "--out", str(out)]) == 0
    w = load_weights(out)
    assert isinstance(w.unet, Baked) and w.metadata["training_steps"] == "6"
    assert json.loads(w.metadata["training"])["teacher_sha256"] == load_weights(tiny_weights).sha256
    engine = SamplerEngine(w.unet, w.diffusion, "cpu", torch.float32, cache_dir=tmp_path / "onnx")
    alone, shared = generate(engine, [7], "ddpm", 30), generate(engine, [3, 7, 11], "ddpm", 30)
    assert alone.shape == (1, 8, 8, 3) and np.array_equal(alone[0], shared[1])


def test_chain_states_are_the_students_default_loop():
    """The states distillation takes from the student's own chains are the reverse loop's x_t as the paper writes it,
    x_{t-1} = 1/sqrt(alpha_t) (x_t - (1-alpha_t)/sqrt(1-abar_t) eps_theta(x_t, t)) + sqrt(beta_t) z, all 1000 steps,
    with the noise drawn from the generator given (x_T first, then z at each step but the last)."""
    d = Diffusion(ScheduleConfig(prediction="v"))
    student = mp_unet_like_trained(TINY, 3)
    states = distill.chain_states(student, d, 2, torch.Generator().manual_seed(9))
    assert states.shape == (1000, 2, 3, 8, 8) and torch.isfinite(states).all()
    g, net = torch.Generator().manual_seed(9), Baked(student)
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        for t in range(999, -1, -1):
            torch.testing.assert_close(states[t], x, rtol=1e-4, atol=1e-4)
            tt = torch.full((2,), t)
            eps = d.eps_from_output(net(x, tt.float()), x, tt)
            beta, abar = float(d.betas[t]), float(d.alphas_cumprod[t])
            x = (x - beta / (1 - abar) ** 0.5 * eps) / (1 - beta) ** 0.5
            if t:
                x = x + beta ** 0.5 * torch.randn(x.shape, generator=g)


@needs_celeba()
def test_distill_on_the_students_own_chains(tiny_weights, celeba_tar, tmp_path, monkeypatch):
    """--chain-share takes that share of each batch from the student's chains, drawn again every --chain-every
    steps from its EMA, and the run says so in its metadata; a share of 1 (no images left) or of less than one row
    is refused."""
    draws = []
    real = distill.chain_states

    def counted(student, diffusion, rows, generator):
        draws.append(rows)
        return real(student, diffusion, rows, generator)

    monkeypatch.setattr(distill, "chain_states", counted)
    args = ["--teacher", str(tiny_weights), "--data", str(celeba_tar), "--range", "1-64", "--batch-size", "4",
            "--no-progress", "--out", str(tmp_path / "run"), "--steps", "3"]
    assert distill.main(args + ["--chain-share", "0.5", "--chain-rows", "2", "--chain-every", "2"]) == 0
    assert draws == [2, 2]  # at steps 0 and 2
    meta = json.loads(torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["meta"])
    assert (meta["chain_share"], meta["chain_rows"], meta["chain_every"]) == (0.5, 2, 2)
    for share in ("1", "0.1"):  # no images left; less than one row of a batch of 4
        with pytest.raises(SystemExit, match="chain-share must be in"):
            distill.main(args + ["--chain-share", share])
