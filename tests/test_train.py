import json
import math
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from model.diffusion import Diffusion, ScheduleConfig
from model.engine import SamplerEngine, generate
from model.unet import PRESETS, UNet
from model.weights import load_weights
from train.data import DataError, Source, frame_box, load_images, load_sources
from train.train import load_checkpoint
from train.train import main as train_main
from train.train import parse_args

from conftest import CELEBA_TAR, ROOT, needs_celeba


def make_faces(folder, n=48, size=(178, 218), seed=0):
    """Synthetic 'faces': a bright ellipse on a dark background with two eyes, jittered."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        cx, cy = 89 + rng.normal(0, 4), 121 + rng.normal(0, 4)
        face = ((xx - cx) / 40) ** 2 + ((yy - cy) / 52) ** 2 < 1
        img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 60, 3).astype(np.uint8)
        img[face] = rng.integers(150, 255, 3)
        for ex in (cx - 16, cx + 16):
            img[((xx - ex) ** 2 + (yy - cy + 10) ** 2) < 36] = 20
        Image.fromarray(img).save(folder / f"{i + 1:06d}.jpg", quality=95)
    return folder


def fixed_loss(unet, images, d=None):
    d = d or Diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = images.float() / 127.5 - 1
    t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        return d.training_loss(unet.eval(), x0, t, eps).item()


def _train(args):
    assert train_main([*args, "--no-progress"]) == 0


def test_training_lowers_the_loss_and_exports(tmp_path):
    data = make_faces(tmp_path / "faces")
    out = tmp_path / "run"
    _train(["--data", str(data), "--preset", "tiny", "--out", str(out), "--steps", "80", "--batch-size", "16",
            "--lr", "2e-3", "--warmup", "5", "--log-every", "10", "--sample-every", "80", "--sample-steps", "5"])
    images = load_images(data, 8, progress=False).images
    state = load_checkpoint(out / "ckpt.pt")
    d = Diffusion(ScheduleConfig.from_dict(json.loads(state["schedule"])))
    assert d.config.prediction == "v"  # the default
    torch.manual_seed(0)
    before = fixed_loss(UNet(PRESETS["tiny"]), images, d)
    trained = UNet(PRESETS["tiny"])
    trained.load_state_dict(state["model"])
    after = fixed_loss(trained, images, d)
    assert after < 0.6 * before, (before, after)
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(10, 81, 10)) and logs[-1]["loss"] < logs[0]["loss"]
    assert (out / "samples" / "step_000080.png").is_file()

    r = subprocess.run([sys.executable, "-m", "train.export", str(out), "--out", str(tmp_path / "w.safetensors"),
                        "--dtype", "fp16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with safe_open(tmp_path / "w.safetensors", "pt") as f:  # stored as fp16, not fp32 labelled fp16
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    w = load_weights(tmp_path / "w.safetensors")
    assert w.metadata["training_steps"] == "80" and w.unet.config == PRESETS["tiny"]
    training = json.loads(w.metadata["training"])
    assert training["command"].startswith("python -m train --data") and training["ema"] is True
    ema = UNet(PRESETS["tiny"])
    ema.load_state_dict(state["ema"])
    for k, v in ema.state_dict().items():
        assert torch.allclose(w.unet.state_dict()[k], v, rtol=1e-3, atol=1e-3)
    imgs = generate(SamplerEngine(w.unet, w.diffusion), [0, 1], "ddim", 10)
    assert imgs.shape == (2, 8, 8, 3)
    r = subprocess.run([sys.executable, "-m", "train.export", str(tmp_path / "nothing"), "--out", "x.safetensors"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nothing/ckpt.pt" in r.stderr


def test_init_starts_from_exported_weights_and_records_them(tmp_path):
    data = make_faces(tmp_path / "faces", n=40)
    common = ["--data", str(data), "--preset", "tiny", "--batch-size", "8", "--sample-every", "1000"]
    _train([*common, "--out", str(tmp_path / "first"), "--steps", "15", "--prediction", "eps"])
    first = tmp_path / "first.safetensors"
    from train.export import main as export_main
    assert export_main([str(tmp_path / "first"), "--out", str(first)]) == 0
    # lr 0: the weights cannot move, so the second run's export must be the first one's weights exactly
    _train([*common, "--out", str(tmp_path / "second"), "--steps", "3", "--init", str(first), "--lr", "0",
            "--prediction", "v"])
    second = tmp_path / "second.safetensors"
    assert export_main([str(tmp_path / "second"), "--out", str(second)]) == 0
    a, b = load_weights(first), load_weights(second)
    for k, v in a.unet.state_dict().items():
        assert torch.equal(b.unet.state_dict()[k], v), k
    assert b.metadata["training_steps"] == "18" and b.diffusion.config.prediction == "v"
    training = json.loads(b.metadata["training"])
    assert training["init"]["sha256"] == a.sha256 and training["init"]["training_steps"] == 15
    assert [h["command"].count("--init") for h in training["history"]] == [0, 1]
    with pytest.raises(SystemExit, match="--init: .*nothing.safetensors"):
        train_main([*common, "--out", str(tmp_path / "third"), "--init", str(tmp_path / "nothing.safetensors")])


def test_resume_is_exact(tmp_path):
    data = make_faces(tmp_path / "faces", n=40)
    common = ["--data", str(data), "--preset", "tiny", "--batch-size", "8", "--warmup", "10", "--log-every", "5",
              "--sample-every", "1000", "--dropout", "0.1"]
    _train([*common, "--out", str(tmp_path / "straight"), "--steps", "40"])
    _train([*common, "--out", str(tmp_path / "resumed"), "--steps", "20"])
    _train([*common, "--out", str(tmp_path / "resumed"), "--steps", "40", "--resume"])
    a, b = load_checkpoint(tmp_path / "straight" / "ckpt.pt"), load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert a["step"] == b["step"] == 40
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_two_process_ddp_stays_in_sync(tmp_path):
    data = make_faces(tmp_path / "faces", n=32)
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "train", "--data", str(data), "--preset", "tiny", "--out", str(out), "--steps", "12",
                        "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--log-every", "4",
                        "--sample-every", "1000", "--no-progress",
                        "--device", "cpu", "--threads", "1", "--precision", "fp32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1] == {"step": 12, "ranks_in_sync": True, "max_param_diff": 0.0}
    assert [r["step"] for r in logs[:-1]] == [4, 8, 12]  # rank 0 alone logs
    ddp = load_checkpoint(out / "ckpt.pt")
    assert ddp["step"] == 12
    # one process with the same global batch trains the same model: each rank took its own slice of the data
    # and of the draws (a rank-ignoring data order would keep the ranks in sync, but train on half the images);
    # in fp32, since bf16's rounding depends on how the batch is split (kernels chosen by shape)
    _train(["--data", str(data), "--preset", "tiny", "--out", str(tmp_path / "one"), "--steps", "12",
            "--batch-size", "8", "--lr", "2e-3", "--warmup", "2", "--log-every", "4", "--sample-every", "1000",
            "--device", "cpu", "--precision", "fp32"])
    one = load_checkpoint(tmp_path / "one" / "ckpt.pt")
    torch.manual_seed(0)
    init = UNet(PRESETS["tiny"]).state_dict()
    moved = max((one["model"][k] - init[k]).abs().max().item() for k in init)
    differ = max((ddp["model"][k] - one["model"][k]).abs().max().item() for k in init)
    print(f"trained weights moved by {moved:.2e}; DDP vs one process differ by {differ:.2e}")
    assert differ < 1e-4 and moved > 50 * 1e-4  # measured: 2.9e-5 (Adam amplifies float rounding) and 2.2e-2


@needs_celeba()
def test_a_few_steps_on_the_shared_celeba_tar_lower_the_loss(tmp_path):
    out = tmp_path / "celeba"
    _train(["--data", str(CELEBA_TAR), "--range", "1-256", "--preset", "tiny", "--out", str(out), "--steps", "60",
            "--batch-size", "32", "--lr", "2e-3", "--warmup", "5", "--log-every", "10", "--sample-every", "1000"])
    images = load_images(CELEBA_TAR, 8, range_="8001-8064", progress=False).images  # held-out images
    torch.manual_seed(0)
    before = fixed_loss(UNet(PRESETS["tiny"]), images)
    trained = UNet(PRESETS["tiny"])
    trained.load_state_dict(load_checkpoint(out / "ckpt.pt")["model"])
    assert fixed_loss(trained, images) < 0.6 * before


@needs_celeba()
def test_celeba_framing_and_range():
    s = load_images(CELEBA_TAR, 64, range_="8001-8010", progress=False)
    assert s.images.shape == (10, 3, 64, 64) and s.names[0] == "008001.jpg" and s.names[-1] == "008010.jpg"
    assert frame_box(89, 109, "auto") == (12.5, 28.5, 76.5, 92.5)  # the README's box: centre (44.5, 60.5)


def test_several_sources_each_with_its_range(celeba_tar, celeba_more_tar):
    both = load_sources([Source(str(celeba_tar), "8001-8003"), Source(str(celeba_more_tar), "10001-10002")], 32,
                        progress=False)
    assert both.names == [f"{celeba_tar.name}:00800{i}.jpg" for i in (1, 2, 3)] + \
                         [f"{celeba_more_tar.name}:01000{i}.jpg" for i in (1, 2)]
    first = load_images(celeba_tar, 32, range_="8001-8003", progress=False).images
    second = load_images(celeba_more_tar, 32, range_="10001-10002", progress=False).images
    assert torch.equal(both.images, torch.cat([first, second]))  # decoded as each alone, in the order given
    with pytest.raises(DataError, match="5 readable images, at least 6 needed"):
        load_sources([Source(str(celeba_tar), "8001-8003"), Source(str(celeba_more_tar), "10001-10002")], 32,
                     min_images=6, progress=False)


def test_each_range_belongs_to_the_data_before_it(capsys):
    a = parse_args(["--data", "A.tar", "--range", "1-8000", "--data", "B.tar", "--out", "r"])
    assert a.sources == [Source("A.tar", "1-8000"), Source("B.tar", None)]
    assert parse_args(["--data", "A", "--out", "r"]).sources == [Source("A")]
    for argv, message in ((["--range", "1-8", "--data", "A", "--out", "r"], "--range must follow the --data"),
                          (["--data", "A", "--range", "1-8", "--range", "9-10", "--out", "r"], "two --range options"),
                          (["--out", "r"], "--data")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_official_layout_with_partition_file(tmp_path):
    root = tmp_path / "img_align_celeba"
    make_faces(root, n=6)
    (tmp_path / "list_eval_partition.txt").write_text(
        "\n".join(f"{i:06d}.jpg {0 if i <= 4 else 1}" for i in range(1, 7)))
    s = load_images(root, 16, progress=False)
    assert s.names == [f"{i:06d}.jpg" for i in range(1, 5)]


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_images(tmp_path / "missing", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images found"):
        load_images(tmp_path / "empty", 8)
    few = make_faces(tmp_path / "few", n=3)
    with pytest.raises(DataError, match="3 readable images, at least 16 needed"):
        load_images(few, 8, min_images=16)
    with pytest.raises(DataError, match="no images found in range 100-200"):
        load_images(few, 8, range_="100-200")
    with pytest.raises(DataError, match="expected FIRST-LAST"):
        load_images(few, 8, range_="ten")
    # unreadable files are skipped and counted, not a crash
    broken = make_faces(tmp_path / "broken", n=5)
    (broken / "000099.jpg").write_bytes(b"this is not a jpeg")
    (broken / "000098.png").write_bytes(b"")
    s = load_images(broken, 8, progress=False)
    assert len(s.names) == 5 and sorted(n for n, _ in s.skipped) == ["000098.png", "000099.jpg"]
    mixed = make_faces(tmp_path / "mixed", n=3)
    make_faces(tmp_path / "mixed_big", n=1, size=(356, 436))
    (tmp_path / "mixed_big" / "000001.jpg").rename(mixed / "000010.jpg")
    with pytest.raises(DataError, match="mixed sizes: 178x218 .*356x436"):
        load_images(mixed, 8, progress=False)
    assert load_images(mixed, 8, framing="center", progress=False).images.shape[0] == 4
    # a tar of images works like a folder
    with tarfile.open(tmp_path / "faces.tar", "w") as tf:
        for p in sorted(few.iterdir()):
            tf.add(p, arcname=p.name)
    assert load_images(tmp_path / "faces.tar", 8, progress=False).names == ["000001.jpg", "000002.jpg", "000003.jpg"]


def test_cli_reports_bad_data_without_a_traceback(tmp_path):
    few = make_faces(tmp_path / "few", n=3)
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(few), "--preset", "tiny", "--out",
                        str(tmp_path / "run"), "--batch-size", "8"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and f"error: {few}: 3 readable images, at least 8 needed" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "train", "--data", str(few), "--out", str(tmp_path / "none"),
                        "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ckpt.pt does not exist" in r.stderr


def test_compile_flag_trains_the_same_model(tmp_path):
    """--compile (torch.compile, inductor on CPU: about two minutes of compiling here) takes the same steps."""
    data = make_faces(tmp_path / "faces", n=16)
    common = ["--data", str(data), "--preset", "tiny", "--steps", "3", "--batch-size", "8", "--log-every", "1",
              "--sample-every", "1000"]
    from torch._dynamo.utils import counters

    counters.clear()
    _train([*common, "--out", str(tmp_path / "eager")])
    assert counters["stats"]["unique_graphs"] == 0  # eager training compiles nothing
    _train([*common, "--out", str(tmp_path / "compiled"), "--compile"])
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the U-Net and inductor compiled it
    a, b = load_checkpoint(tmp_path / "eager" / "ckpt.pt"), load_checkpoint(tmp_path / "compiled" / "ckpt.pt")
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4), k


def test_pick_preset_takes_the_largest_that_fits_the_budget_else_the_fastest():
    def pick(min_steps):
        r = subprocess.run([sys.executable, "-m", "train.pick_preset", "--candidates", "tiny", "cpu32", "--budget",
                            "10", "--min-steps", str(min_steps), "--batch-size", "2", "--seconds", "0.3",
                            "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip(), r.stderr

    chosen, table = pick(1)  # both fit: the larger one
    assert chosen == "cpu32" and "| cpu32 | 0.69M |" in table and "chosen" in table
    chosen, _ = pick(10**9)  # none fits: the faster one
    assert chosen == "tiny"


def test_power_ema_is_edm2s_profile():
    from train.train import SIGMA_REL_MAX, ema_decay_at, power_ema_gamma
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 (Karras et al. 2024), section 3.1
    assert power_ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert power_ema_gamma(SIGMA_REL_MAX - 1e-12) == pytest.approx(0.0, abs=1e-3)
    g = power_ema_gamma(0.1)
    assert ema_decay_at(0, 0.9999, g) == 0.0  # the first step's average is the model itself
    # the average it keeps weights step tau (1-based) by the integral of (g+1) x^g over [tau-1, tau], i.e. by
    # tau^(g+1) - (tau-1)^(g+1): the profile tau^g of the paper, exact in discrete steps
    thetas = torch.randn(200, dtype=torch.float64)
    ema = torch.zeros((), dtype=torch.float64)
    for step, theta in enumerate(thetas):
        d = ema_decay_at(step, 0.9999, g)
        ema = d * ema + (1 - d) * theta
    tau = torch.arange(1, 201, dtype=torch.float64)
    w = tau ** (g + 1) - (tau - 1) ** (g + 1)
    assert ema.item() == pytest.approx((w * thetas).sum().item() / w.sum().item(), rel=1e-9)
    assert ema_decay_at(5, 0.9999) == pytest.approx(6 / 15)  # the constant decay's warm-up, as before


def test_bf16_is_chosen_where_the_cpu_multiplies_it(tmp_path):
    from train.train import cpu_has_bf16, resolve_precision
    with_bf16, without = tmp_path / "a", tmp_path / "b"
    with_bf16.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    without.write_text("flags\t\t: fpu avx2\n")
    assert cpu_has_bf16(with_bf16) and not cpu_has_bf16(without) and not cpu_has_bf16(tmp_path / "none")
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_bf16() else "fp32")
    from train.train import training_memory_format
    cpu = torch.device("cpu")
    assert training_memory_format("auto", cpu, "bf16") == torch.contiguous_format  # faster for bf16 on the CPU
    assert training_memory_format("auto", cpu, "fp32") == torch.channels_last
    assert training_memory_format("channels_last", cpu, "bf16") == torch.channels_last  # asked for: kept


@pytest.mark.parametrize("flags", [["--loss-weight", "min-snr"], ["--loss-weight", "edm", "--t-sampling", "edm"],
                                   ["--ema-std", "0.1", "--precision", "bf16"]])
def test_each_recipe_option_trains_and_is_recorded(tmp_path, flags):
    data = make_faces(tmp_path / "faces", n=16)
    out = tmp_path / "run"
    _train(["--data", str(data), "--preset", "tiny", "--out", str(out), "--steps", "30", "--batch-size", "8",
            "--lr", "2e-3", "--warmup", "2", "--log-every", "10", "--sample-every", "1000", *flags])
    state = load_checkpoint(out / "ckpt.pt")
    meta = json.loads(state["meta"])
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logs) and logs[-1]["loss"] < logs[0]["loss"]
    if "--loss-weight" in flags:
        assert meta["objective"]["weighting"] == flags[1]
    if "--t-sampling" in flags:
        assert meta["objective"]["t_sampling"] == "edm"
    if "--ema-std" in flags:
        assert meta["ema_std"] == 0.1 and meta["precision"] == "bf16"
    assert meta["data"] == [{"path": str(data), "range": None}]


def test_bad_recipe_options_are_refused(capsys):
    for argv, message in ((["--ema-std", "0.5"], "--ema-std must be in"), (["--loss-weight", "snr"], "invalid choice")):
        with pytest.raises(SystemExit):
            parse_args(["--data", "A", "--out", "r", *argv])
        assert message in capsys.readouterr().err
