import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from model.diffusion import ScheduleConfig, cosine_betas
from model.unet import PRESETS, UNet, UNetConfig, count_parameters
from model.weights import FORMAT, WeightsError, file_sha256, load_weights, save_weights

from conftest import ROOT


def test_celeba64_parameter_count():
    n = count_parameters(UNet(PRESETS["celeba64"]))
    assert abs(n - 78.7e6) / 78.7e6 < 0.02, n


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"])
    path = tmp_path / "w.safetensors"
    save_weights(path, unet, ScheduleConfig(kind="cosine"), name="rt", dataset="d", training_steps=12,
                 training={"command": "python -m train ..."})
    w = load_weights(path)
    assert w.unet.config == unet.config and w.diffusion.config.kind == "cosine"
    assert torch.equal(w.diffusion.betas, cosine_betas(1000))  # the tables are cosine, not only the label
    assert w.metadata["training_steps"] == "12" and w.metadata["format"] == FORMAT and w.name == "rt"
    assert json.loads(w.metadata["training"])["command"].startswith("python -m train")
    assert w.sha256 == file_sha256(path)
    for k, v in unet.state_dict().items():
        assert torch.equal(w.unet.state_dict()[k], v)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(w.unet(x, t), unet.eval()(x, t))


def test_fp16_round_trip_is_close(tmp_path):
    unet = UNet(PRESETS["tiny"])
    save_weights(tmp_path / "h.safetensors", unet, ScheduleConfig(), name="h", dataset="d", training_steps=0,
                 dtype=torch.float16)
    with safe_open(tmp_path / "h.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    w = load_weights(tmp_path / "h.safetensors")
    for k, v in unet.state_dict().items():
        assert torch.allclose(w.unet.state_dict()[k], v, rtol=1e-3, atol=1e-4)


def _bad(tmp_path, tiny_weights):
    """(name, path, expected message part) for every kind of unusable file."""
    cases = [("missing", tmp_path / "nope.safetensors", "no such file"), ("folder", tmp_path, "not a regular file")]
    data = tiny_weights.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(("truncated", tmp_path / "trunc.safetensors", "not a readable safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    cases.append(("empty", tmp_path / "empty.safetensors", "not a readable safetensors"))
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"weight": [1, 2, 3]}))
    cases.append(("pickle", tmp_path / "pickle.pt", "not a readable safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "nometa.safetensors"))
    cases.append(("no metadata", tmp_path / "nometa.safetensors", "metadata lacks"))
    unet = UNet(PRESETS["tiny"])
    sd = {k: v.contiguous() for k, v in unet.state_dict().items()}
    meta = {"format": FORMAT, "unet_config": json.dumps(PRESETS["cpu32"].to_dict()),
            "schedule": json.dumps(ScheduleConfig().to_dict()), "image_size": "32", "dataset": "d",
            "training_steps": "0", "code_version": "x"}
    save_file(sd, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    cases.append(("other architecture", tmp_path / "mismatch.safetensors", "tensors don't match the config"))
    wider = {**PRESETS["tiny"].to_dict(), "base_channels": 32}
    save_file(sd, str(tmp_path / "wider.safetensors"), metadata={**meta, "unet_config": json.dumps(wider),
                                                                 "image_size": "8"})
    cases.append(("shape mismatch", tmp_path / "wider.safetensors", "has shape"))
    sd2 = dict(sd)
    sd2.pop("conv_in.weight")
    save_file(sd2, str(tmp_path / "missing_tensor.safetensors"),
              metadata={**meta, "unet_config": json.dumps(PRESETS["tiny"].to_dict()), "image_size": "8"})
    cases.append(("missing tensor", tmp_path / "missing_tensor.safetensors", "missing ['conv_in.weight']"))
    save_file(sd, str(tmp_path / "badcfg.safetensors"),
              metadata={**meta, "unet_config": json.dumps({"image_size": 8, "wings": 2})})
    cases.append(("bad config", tmp_path / "badcfg.safetensors", "bad architecture"))
    save_file(sd, str(tmp_path / "fmt.safetensors"), metadata={**meta, "format": "other/1"})
    cases.append(("wrong format", tmp_path / "fmt.safetensors", "metadata format"))
    return cases


def test_every_bad_file_gives_one_clear_error(tmp_path, tiny_weights):
    for name, path, message in _bad(tmp_path, tiny_weights):
        with pytest.raises(WeightsError) as e:
            load_weights(path)
        assert str(path) in str(e.value) and message in str(e.value), (name, str(e.value))


def test_sample_cli_writes_pngs_with_provenance(tmp_path, tiny_weights):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "model.sample", "--weights", str(tiny_weights), "--n", "3",
                        "--seed", "7", "--steps", "20", "--sampler", "ddim", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["7.png", "8.png", "9.png", "grid.png"]
    img = Image.open(out / "8.png")
    assert img.size == (8, 8)
    assert img.text == {"seed": "8", "sampler": "ddim", "steps": "20", "weights_sha256": file_sha256(tiny_weights),
                        "model": "tiny-test"}
    assert "100%" in r.stderr  # the progress bar ran to the end
    # image i of seed s is the image of seed s + i alone
    out2 = tmp_path / "out2"
    subprocess.run([sys.executable, "-m", "model.sample", "--weights", str(tiny_weights), "--n", "1", "--seed", "8",
                    "--steps", "20", "--sampler", "ddim", "--out", str(out2), "--npz", str(tmp_path / "s.npz")],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert (out2 / "8.png").read_bytes() == (out / "8.png").read_bytes()
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:  # the form train.evaluate --images reads
        assert z["images"].dtype == np.uint8 and z["seeds"].tolist() == [8]
        assert np.array_equal(z["images"][0], np.asarray(Image.open(out / "8.png").convert("RGB")))


def test_sample_cli_bad_weights_names_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not weights")
    r = subprocess.run([sys.executable, "-m", "model.sample", "--weights", str(bad), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_shipped_weights_describe_their_training_and_never_saw_the_validation_images():
    from model.weights import DEFAULT_WEIGHTS

    assert DEFAULT_WEIGHTS.stat().st_size < 20 * 2**20
    w = load_weights(DEFAULT_WEIGHTS)
    assert w.unet.config == PRESETS["cpu32"] and w.diffusion.config.prediction == "v"
    training = json.loads(w.metadata["training"])
    commands = [h["command"] for h in training["history"]]
    assert len(commands) >= 2 and all("--range 1-8000" in c for c in commands)  # 8001-9000 are held out
    assert training["ema"] is True and "--prediction v" in commands[-1] and "--init" in commands[-1]
    assert int(w.metadata["training_steps"]) > training["init"]["training_steps"] > 0  # both stages counted


def test_shipped_mp_weights_are_cpu32s_student_and_make_its_faces():
    """weights/celeba32-cpu-mp.safetensors: an mp-unet in cpu32's shape and schedule, distilled from the shipped
    cpu32 (its sha256 recorded) on images 1-8000 only; for a seed it makes nearly cpu32's image (mean difference
    4-7/255 over 20 ddim steps, where another seed's image differs by ~58)."""
    from model.engine import SamplerEngine, generate
    from model.mp_unet import Baked, MPConfig
    from model.weights import DEFAULT_WEIGHTS

    path = DEFAULT_WEIGHTS.with_name("celeba32-cpu-mp.safetensors")
    assert path.stat().st_size < 20 * 2**20
    student, teacher = load_weights(path), load_weights(DEFAULT_WEIGHTS)
    assert isinstance(student.unet, Baked) and student.unet.config == MPConfig.like(PRESETS["cpu32"])
    assert student.diffusion.config == teacher.diffusion.config
    training = json.loads(student.metadata["training"])
    assert training["teacher_sha256"] == file_sha256(DEFAULT_WEIGHTS) and training["range"] == "1-8000"
    assert int(student.metadata["training_steps"]) == 20000
    assert "--chain-share 0.5" in training["history"][-1]["command"]  # its last 3000 steps: on its own chains
    seeds = [0, 1, 2, 3]
    ours, theirs = (generate(SamplerEngine(w.unet, w.diffusion), seeds, "ddim", 20, 4).astype(float)
                    for w in (student, teacher))
    assert np.abs(ours - theirs).mean() < 12


def test_shipped_gpu_weights_are_64x64_trained_on_a_gpu_and_sample_faces_on_cpu():
    from model.engine import SamplerEngine, generate
    from model.weights import GPU_WEIGHTS

    assert GPU_WEIGHTS.stat().st_size < 20 * 2**20
    w = load_weights(GPU_WEIGHTS)
    assert w.unet.config == UNetConfig.from_dict({**PRESETS["celeba64-2m"].to_dict(), "dropout": 0.0})
    training = json.loads(w.metadata["training"])
    assert training["device"] == "cuda:0" and "--range 1-8000" in training["command"] and training["ema"] is True
    assert int(w.metadata["training_steps"]) == 3100
    images = generate(SamplerEngine(w.unet, w.diffusion), [0, 1], "ddim", 20, 2)
    assert images.shape == (2, 64, 64, 3) and 40 < images.mean() < 215 and images.std() > 20


def test_the_service_and_cli_default_to_the_weights_for_their_device(monkeypatch):
    from model.weights import DEFAULT_WEIGHTS, GPU_WEIGHTS, default_weights
    from service.settings import Settings

    assert default_weights(torch.device("cpu")) == DEFAULT_WEIGHTS
    assert default_weights(torch.device("cuda", 0)) == GPU_WEIGHTS
    monkeypatch.setenv("CELEBA_DDPM_WEIGHTS", "")  # compose passes an unset variable as empty: the default
    assert Settings().weights is None and Settings().weights_path(torch.device("cuda", 0)) == GPU_WEIGHTS
    monkeypatch.setenv("CELEBA_DDPM_WEIGHTS", "/models/mine.safetensors")
    assert Settings().weights_path(torch.device("cuda", 0)) == Path("/models/mine.safetensors")
