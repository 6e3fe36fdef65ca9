"""Editing rows (model/edit.py, model/engine.py): RePaint inpainting, SDEdit image-to-image, interpolation."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, needs_celeba
from model.diffusion import Diffusion
from model.edit import interpolation_starts, to_model
from model.engine import Edit, SampleSpec, SamplerEngine, generate, to_uint8
from model.images import frame
from model.unet import PRESETS, UNet
from model.weights import DEFAULT_WEIGHTS, load_weights

TINY = PRESETS["tiny"]


def tiny_engine(seed=0):
    torch.manual_seed(seed)
    return SamplerEngine(UNet(TINY), Diffusion())


def images_of(engine, rows):
    """rows: (group, SampleSpec, Edit | None); all added at once, run to the end; {group: image}."""
    for group, spec, edit in rows:
        engine.add(group, [spec], edits=[edit])
    out = {}
    while len(engine):
        for group, _, img in engine.step().finished:
            out[group] = img
    return out


def u8(x: torch.Tensor) -> np.ndarray:
    """One 3xHxW image in [-1, 1] as the engine hands images out (HxWx3 uint8)."""
    return to_uint8(x[None])[0].numpy()


def test_landing_levels_and_partial_chains():
    d = Diffusion()
    assert d.t_max_for_strength(1.0) == 999 and d.t_max_for_strength(0.5) == 499
    with pytest.raises(ValueError):
        d.t_max_for_strength(0)
    ts = d.timesteps(50, "uniform", t_max=499)
    assert ts[0] == 499 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    ts = d.timesteps(20, "logsnr", t_max=300)
    assert ts[0] == 300 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    with pytest.raises(ValueError, match=r"steps must be in \[1, 11\]"):
        d.timesteps(12, t_max=10)
    land = d.landing("ddpm", 1000)
    assert torch.allclose(land[:-1, 0] ** 2, d.alphas_cumprod[:-1].flip(0))  # step k lands on t = 998 - k ...
    assert land[-1].tolist() == [1.0, 0.0]  # ... and the last one on x_0 itself


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddpm", 50), ("ddim", 20)])
def test_inpainting_keeps_the_known_pixels_and_fills_the_hole(sampler, steps):
    engine = tiny_engine()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 8, 8, generator=g) * 2 - 1
    keep = torch.ones(1, 8, 8, dtype=torch.bool)
    keep[:, 2:6, 2:6] = False  # the centre 50% square is repainted
    out = images_of(engine, [(s, SampleSpec(s, sampler, steps), Edit(image=image, keep=keep)) for s in (1, 2)])
    ref = u8(image)
    known = keep[0].numpy()
    for s in (1, 2):
        diff = np.abs(out[s].astype(int) - ref.astype(int))
        assert diff[known].max() <= 1 and (diff[known] == 0).mean() >= 0.99
    assert not np.array_equal(out[1][~known], out[2][~known])  # the hole is drawn, per seed


def test_edit_rows_share_a_batch_with_plain_rows_and_change_nothing_of_them():
    image = torch.linspace(-1, 1, 3 * 64).view(3, 8, 8)
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[:, :, :4] = True
    rows = {
        "plain": (SampleSpec(3, "ddpm", 200), None),
        "inpaint": (SampleSpec(4, "ddpm", 200), Edit(image=image, keep=keep)),
        "sdedit": (SampleSpec(5, "ddim", 20, t_max=399), Edit(image=image)),
        "interp": (SampleSpec(6, "dpm-solver++", 20), Edit(x_start=interpolation_starts(1, 2, 3, (3, 8, 8))[1])),
    }
    together = images_of(tiny_engine(), [(k, spec, e) for k, (spec, e) in rows.items()])
    for k, (spec, e) in rows.items():
        alone = images_of(tiny_engine(), [(k, spec, e)])[k]
        assert np.array_equal(alone, together[k]), k  # pixel-identical on CPU, whatever shares the batch
    assert np.array_equal(together["plain"], generate(tiny_engine(), [3], "ddpm", 200, 1)[0])


def test_an_edit_is_determined_by_its_seed():
    image = torch.zeros(3, 8, 8)
    keep = torch.zeros(1, 8, 8, dtype=torch.bool)
    keep[:, :4] = True
    run = lambda seed: images_of(tiny_engine(), [("x", SampleSpec(seed, "ddpm", 100), Edit(image, keep))])["x"]  # noqa: E731
    assert np.array_equal(run(7), run(7)) and not np.array_equal(run(7), run(8))


@needs_celeba()
def test_sdedit_moves_away_from_the_input_with_strength_and_one_is_plain_sampling(celeba_tar):
    import tarfile

    with tarfile.open(celeba_tar) as t:
        face = Image.open(t.extractfile("008001.jpg"))
        face.load()
    w = load_weights(DEFAULT_WEIGHTS)
    image = to_model(frame(face, 32))
    ref = u8(image).astype(float)

    def edit(strength, seeds=(0, 1, 2, 3)):
        engine = SamplerEngine(w.unet, w.diffusion)
        t_max = w.diffusion.t_max_for_strength(strength)
        return images_of(engine, [(s, SampleSpec(s, "ddim", 20, t_max=t_max), Edit(image=image)) for s in seeds])

    dist = {s: np.mean([np.abs(img - ref).mean() for img in edit(s).values()]) for s in (0.1, 0.4, 0.7, 1.0)}
    assert dist[0.1] < dist[0.4] < dist[0.7] < dist[1.0], dist
    print(dist)
    assert dist[0.1] < dist[1.0] / 3  # a light edit keeps the face
    # strength 1 noises the face beyond recognition: the image plain sampling gives for that seed, nearly
    plain = generate(SamplerEngine(w.unet, w.diffusion), [0, 1], "ddim", 20, 2)
    full = edit(1.0, (0, 1))
    same_seed = np.abs(full[0].astype(float) - plain[0]).mean()
    other_seed = np.abs(full[0].astype(float) - plain[1]).mean()
    assert same_seed < 4 and same_seed < other_seed / 5, (same_seed, other_seed)


def test_interpolation_is_a_smooth_path_from_seed_a_to_seed_b():
    w = load_weights(DEFAULT_WEIGHTS)
    starts = interpolation_starts(3, 11, 8, (3, 32, 32))
    frames = images_of(SamplerEngine(w.unet, w.diffusion),
                       [(j, SampleSpec(3, "ddim", 20), Edit(x_start=x)) for j, x in enumerate(starts)])
    frames = np.stack([frames[j] for j in range(8)]).astype(float)
    steps = [np.abs(frames[j + 1] - frames[j]).mean() for j in range(7)]
    ends = np.abs(frames[-1] - frames[0]).mean()
    assert max(steps) < ends / 2, (steps, ends)  # consecutive frames are close; the end points are not
    plain = generate(SamplerEngine(w.unet, w.diffusion), [3, 11], "ddim", 20, 2)
    assert np.array_equal(frames[0], plain[0]) and np.array_equal(frames[-1], plain[1])
    norms = [x.norm() / starts[0].norm() for x in starts]
    assert all(0.97 < r < 1.03 for r in norms)  # slerp keeps a Gaussian sample's norm (a straight line would not)
    same = interpolation_starts(5, 5, 4, (3, 32, 32))  # one seed at both ends: every frame is that seed's x_T
    assert all(torch.isfinite(x).all() and torch.allclose(x, same[0]) for x in same)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "model.edit", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_edit_cli_inpaints_edits_and_interpolates(tmp_path):
    photo = tmp_path / "face.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (109, 89, 3), dtype=np.uint8)).save(photo)
    mask = np.zeros((109, 89), np.uint8)
    mask[40:80, 25:65] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    r = _cli("--image", photo, "--mask", tmp_path / "mask.png", "--n", 2, "--seed", 5, "--steps", 20,
             "--out", tmp_path / "inpaint")
    assert r.returncode == 0, r.stderr
    assert {p.name for p in (tmp_path / "inpaint").iterdir()} == {"input.png", "5.png", "6.png", "grid.png"}
    assert Image.open(tmp_path / "inpaint" / "5.png").text["mode"] == "inpaint"
    r = _cli("--image", photo, "--strength", 0.3, "--sampler", "ddim", "--steps", 10, "--out", tmp_path / "img2img")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "img2img" / "0.png").text["strength"] == "0.3"
    r = _cli("--interpolate", 3, 11, "--frames", 4, "--steps", 10, "--out", tmp_path / "interp")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "interp" / "strip.png").size[0] > 4 * 32


def test_edit_cli_refuses_bad_input_naming_the_file(tmp_path):
    photo = tmp_path / "face.png"
    Image.fromarray(np.zeros((109, 89, 3), np.uint8)).save(photo)
    (tmp_path / "not.jpg").write_bytes(b"not an image")
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(tmp_path / "small-mask.png")
    Image.fromarray(np.zeros((109, 89), np.uint8)).save(tmp_path / "empty-mask.png")
    cases = [
        (["--image", tmp_path / "not.jpg"], "not.jpg: cannot read the image"),
        (["--image", photo, "--mask", tmp_path / "small-mask.png"], "the mask is 50x50, the image 89x109"),
        (["--image", photo, "--mask", tmp_path / "empty-mask.png"], "marks nothing to repaint"),
        (["--image", photo, "--strength", 1.5], "strength must be in (0, 1]"),
        (["--image", photo, "--strength", 0.01, "--steps", 50], "steps must be in [1, 10]"),
    ]
    for args, message in cases:
        r = _cli(*args, "--out", tmp_path / "o", timeout=120)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = _cli("--interpolate", 1, 2, "--frames", 17, "--out", tmp_path / "o", timeout=120)
    assert r.returncode == 2 and "--frames must be in 2..16" in r.stderr


# ---- the HTTP routes: POST /v1/edits, POST /v1/interpolations -------------------------------------------------

@pytest.fixture(scope="module")
def served(tiny_weights):
    from service.settings import Settings
    from service_helpers import running

    with running(Settings(weights=tiny_weights, max_batch=8, max_n=8, queue_size=8)) as (url, app):
        yield url, app


def _png(array) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _gif(array) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="GIF")
    return buf.getvalue()


def _photo_and_mask():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 255, (109, 89, 3), dtype=np.uint8)  # CelebA's half-size shape: the face box framing
    mask = np.zeros((109, 89), np.uint8)
    mask[50:75, 30:60] = 255
    return photo, mask


def test_edits_inpaint_over_json_and_multipart_alike(served, tiny_weights):
    import base64

    import httpx

    from service_helpers import decode_png

    url, _ = served
    photo, mask = _photo_and_mask()
    fields = {"n": 2, "seed": 5, "sampler": "ddpm", "steps": 30}
    r = httpx.post(url + "/v1/edits", timeout=120, json={
        **fields, "image": base64.b64encode(_png(photo)).decode(), "mask": base64.b64encode(_png(mask)).decode()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "inpaint" and body["strength"] == 1.0 and "CelebA face box" in body["framing"]
    assert [im["seed"] for im in body["images"]] == [5, 6]
    r2 = httpx.post(url + "/v1/edits", timeout=120, data={k: str(v) for k, v in fields.items()},
                    files={"image": ("face.png", _png(photo), "image/png"), "mask": ("m.png", _png(mask), "image/png")})
    assert r2.status_code == 200, r2.text
    assert [im["png"] for im in r2.json()["images"]] == [im["png"] for im in body["images"]]  # same request, same PNGs
    # the known pixels came back: the framed photo where the mask is black, as model.edit computes it offline
    w = load_weights(tiny_weights)
    framed = frame(Image.fromarray(photo), 8)
    keep = frame(Image.fromarray(mask).convert("RGB"), 8)[..., 0] < 128
    got, _ = decode_png(body["images"][0]["png"])
    assert np.abs(got[keep].astype(int) - framed[keep].astype(int)).max() <= 1
    offline = images_of(SamplerEngine(w.unet, w.diffusion), [("x", SampleSpec(5, "ddpm", 30),
                                                              Edit(image=to_model(framed),
                                                                   keep=torch.from_numpy(keep)[None]))])["x"]
    assert np.array_equal(got, offline)


def test_edits_img2img_as_a_job_with_previews(served):
    import base64

    import httpx

    url, _ = served
    photo, _ = _photo_and_mask()
    r = httpx.post(url + "/v1/edits", timeout=60, json={"image": base64.b64encode(_png(photo)).decode(),
                                                        "strength": 0.4, "sampler": "ddim", "steps": 20,
                                                        "job": True, "preview_every": 5})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    from test_jobs import events

    kinds = [k for k, _ in events(url, job_id)]
    assert "preview" in kinds and kinds[-1] == "completed"
    info = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    assert info["state"] == "succeeded" and info["steps"] == 20 and len(info["images"]) == 1


def test_edits_refuse_bad_input_with_a_clear_4xx(served):
    import base64

    import httpx

    url, app = served
    photo, mask = _photo_and_mask()
    img = base64.b64encode(_png(photo)).decode()
    cases = [
        ({"image": "not base64!"}, 422, "image: not valid base64"),
        ({"image": base64.b64encode(b"GIF89a nonsense").decode()}, 422, "image: not an image"),
        ({"image": img, "mask": base64.b64encode(_png(mask[:50, :50])).decode()}, 422, "mask: 50x50, but the image"),
        ({"image": img, "mask": base64.b64encode(_png(np.zeros((109, 89), np.uint8))).decode()}, 422,
         "marks nothing to repaint"),
        ({"image": img, "strength": 0}, 422, "strength"),
        ({"image": img, "strength": 1.5}, 422, "strength"),
        ({"image": img, "strength": 0.005, "steps": 20}, 422, "steps: at most 5 for strength 0.005"),
        ({"image": img, "n": 99}, 422, "n: must be at most 8"),
        ({"image": img, "preview_every": 5}, 422, "previews come through a job"),
        ({"image": img, "bogus": 1}, 422, "bogus"),
        ({"image": base64.b64encode(_png(photo)[:300]).decode()}, 422, "image: "),  # truncated
        ({"image": base64.b64encode(_gif(photo)).decode()}, 422, "GIF is not a format this service takes"),
    ]
    for body, status, message in cases:
        r = httpx.post(url + "/v1/edits", json=body, timeout=60)
        assert r.status_code == status and message in r.json()["detail"], (body.keys(), r.status_code, r.text)
    big = Image.new("RGB", (4097, 4097))
    import io

    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = httpx.post(url + "/v1/edits", files={"image": ("big.png", buf.getvalue(), "image/png")}, timeout=60)
    assert r.status_code == 413 and "4096x4096" in r.json()["detail"]
    r = httpx.post(url + "/v1/edits", content=b"x" * 100, headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]
    r = httpx.post(url + "/v1/edits", data={"n": "1"}, files={"mask": ("m.png", _png(mask), "image/png")},
                   timeout=60)
    assert r.status_code == 422 and "image: required" in r.json()["detail"]
    r = httpx.post(url + "/v1/edits", content=b"0" * (20 * 2**20 + 1), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413 and "over 20971520 bytes" in r.json()["detail"]  # MAX_UPLOAD_BYTES
    r = httpx.post(url + "/generate", content=b'{"n": 1, "pad": "' + b"x" * 5000 + b'"}',
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413  # the upload limit is for /v1/edits only


def test_interpolations_route_returns_the_path_between_two_seeds(served):
    import httpx

    from service_helpers import decode_png

    url, _ = served
    r = httpx.post(url + "/v1/interpolations", json={"seed_a": 3, "seed_b": 11, "frames": 5, "steps": 20},
                   timeout=120)
    assert r.status_code == 200, r.text
    frames = [decode_png(f["png"])[0] for f in r.json()["frames"]]
    assert len(frames) == 5
    ends = [httpx.post(url + "/generate", json={"n": 1, "seed": s, "sampler": "ddim", "steps": 20},
                       timeout=120).json()["images"][0]["png"] for s in (3, 11)]
    assert np.array_equal(frames[0], decode_png(ends[0])[0]) and np.array_equal(frames[-1], decode_png(ends[1])[0])
    strip = httpx.post(url + "/v1/interpolations", json={"seed_a": 3, "seed_b": 11, "frames": 5, "steps": 20},
                       headers={"Accept": "image/png"}, timeout=120)
    assert strip.headers["content-type"] == "image/png"
    assert Image.open(__import__("io").BytesIO(strip.content)).size[0] > 40
    for bad in ({"seed_a": 1, "seed_b": 2, "frames": 1}, {"seed_a": 1, "seed_b": 2, "frames": 17},
                {"seed_a": -1, "seed_b": 2}):
        assert httpx.post(url + "/v1/interpolations", json=bad, timeout=30).status_code == 422


def test_repaint_jumps_go_back_up_and_keep_the_known_pixels():
    from model.diffusion import repaint_path

    assert repaint_path(6) == list(range(7))
    path = repaint_path(6, 2, 3)
    assert path == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 3, 4, 3, 2, 3, 4, 3, 2, 3, 4, 5, 6]
    assert all(abs(q - p) == 1 for p, q in zip(path, path[1:]))
    d = Diffusion()
    plain, jumped = d.coefficients("ddpm", 50), d.coefficients("ddpm", 50, jumps=(5, 3))
    assert torch.equal(d.coefficients("ddpm", 50, jumps=(1, 1)), plain)
    assert len(jumped) == len(repaint_path(50, 5, 3)) - 1
    up = jumped[:, 2] == 0  # forward steps: no network term, x_q = a x_p + c z with a^2 + c^2 = 1 (variance kept)
    assert up.sum() == 9 * 2 * 5 and torch.allclose(jumped[up, 1] ** 2 + jumped[up, 3] ** 2,
                                                             torch.ones(int(up.sum()), dtype=torch.float64))
    with pytest.raises(ValueError, match="stochastic sampler"):
        d.coefficients("ddim", 20, jumps=(5, 2))
    engine = tiny_engine()
    image = torch.linspace(-1, 1, 192).view(3, 8, 8)
    keep = torch.ones(1, 8, 8, dtype=torch.bool)
    keep[:, 2:6, 2:6] = False
    engine.add("j", [SampleSpec(3, "ddpm", 50, jumps=(5, 3))], edits=[Edit(image=image, keep=keep)])
    steps, got = 0, None
    while len(engine):
        out = engine.step()
        steps += 1
        got = out.finished[0][2] if out.finished else got
    assert steps == len(jumped)
    assert np.abs(got.astype(int) - u8(image).astype(int))[keep[0].numpy()].max() <= 1


def test_edits_route_takes_repaint_jumps_as_a_job(served):
    import base64

    import httpx

    url, _ = served
    photo, mask = _photo_and_mask()
    body = {"image": base64.b64encode(_png(photo)).decode(), "mask": base64.b64encode(_png(mask)).decode(),
            "steps": 20, "jump_length": 5, "jump_n_sample": 2, "job": True}
    r = httpx.post(url + "/v1/edits", json=body, timeout=60)
    assert r.status_code == 202, r.text
    from test_jobs import events

    assert [k for k, _ in events(url, r.json()["id"])][-1] == "completed"
    info = httpx.get(f"{url}/v1/jobs/{r.json()['id']}").json()
    assert info["steps"] == 20 + 2 * 5 * 3 and info["step"] == info["total_steps"]  # 3 jumps of 5 up and down
    bad = httpx.post(url + "/v1/edits", json={**body, "mask": None, "job": False}, timeout=60)
    assert bad.status_code == 422 and "for inpainting" in bad.json()["detail"]
