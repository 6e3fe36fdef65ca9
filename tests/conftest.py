import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model.diffusion import Diffusion, ScheduleConfig
from model.mp_unet import MPConfig, MPUNet
from model.unet import PRESETS, UNet
from model.weights import save_weights

ROOT = Path(__file__).resolve().parent.parent
CELEBA = ROOT.parent / "shared" / "data" / "celeba"
CELEBA_TAR = CELEBA / "img_align_celeba_89x109_000001-009000.tar"
CELEBA_MORE_TAR = CELEBA / "img_align_celeba_89x109_more_24477.tar"  # 24,477 more, numbered 010001-126610

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The ONNX Runtime runner caches its exports under $XDG_CACHE_HOME (model/runner_onnx.py): tests and the services
# they start use a fresh one, never the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="celeba-ddpm-test-cache-")
# The suite tests the CPU paths on every host (services it starts, in-process or as subprocesses, read this): on a
# GPU host `auto` would move them to CUDA, where kernels and defaults differ. tests/test_cuda.py asks for CUDA itself.
os.environ["CELEBA_DDPM_DEVICE"] = "cpu"


def make_tiny_weights(path: Path, seed: int = 0, preset: str = "tiny") -> Path:
    torch.manual_seed(seed)
    unet = UNet(PRESETS[preset])
    save_weights(path, unet, ScheduleConfig(), name="tiny-test", dataset="random init (tests)", training_steps=0)
    return path


def mp_unet_like_trained(cfg: MPConfig, seed: int = 0) -> MPUNet:
    """An mp-unet (model/mp_unet.py) whose gains are not their initial zeros, which would hide how they fold."""
    torch.manual_seed(seed)
    m = MPUNet(Diffusion().alphas_cumprod, cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 0:
                p.uniform_(0.3, 1.5)
        m.conv_in_bias.normal_()
    return m.eval()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def nearly_equal(x, y) -> bool:
    """The documented tolerance for images that should match (README "Determinism"): within 1/255 everywhere and
    differing on at most 0.1% of values, for kernels that change with the batch size."""
    diff = np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int))
    return diff.max() <= 1 and (diff > 0).mean() <= 0.001


def skip_or_fail(reason: str) -> None:
    """Something a test needs is absent: skipped on a developer's machine, but a failure in CI (CI=true), which
    always has it, so that a moved file or a dropped package cannot silently turn tests off."""
    if os.environ.get("CI"):
        pytest.fail(reason + "; CI must have it", pytrace=False)
    pytest.skip(reason)


def tool(name: str, package: str) -> str:
    """The path of a command from Debian's packages (on PATH or in /usr/sbin), or skip_or_fail()."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        skip_or_fail(f"{name} not installed (Debian's package {package}; .ci/run installs it)")
    return path


@pytest.fixture
def celeba_tar() -> Path:
    """The shared CelebA tar (see skip_or_fail())."""
    if not CELEBA_TAR.is_file():
        skip_or_fail(f"CelebA tar not found at {CELEBA_TAR} (see ../shared/data/celeba/README.md)")
    return CELEBA_TAR


@pytest.fixture
def celeba_more_tar() -> Path:
    """The second shared CelebA tar (see skip_or_fail())."""
    if not CELEBA_MORE_TAR.is_file():
        skip_or_fail(f"CelebA tar not found at {CELEBA_MORE_TAR} (see ../shared/data/celeba/README.md)")
    return CELEBA_MORE_TAR


def needs_celeba():
    return pytest.mark.usefixtures("celeba_tar")
