import os
import tempfile
from pathlib import Path

import pytest
import torch

from model.diffusion import ScheduleConfig
from model.unet import PRESETS, UNet
from model.weights import save_weights

ROOT = Path(__file__).resolve().parent.parent
CELEBA = ROOT.parent / "shared" / "data" / "celeba"
CELEBA_TAR = CELEBA / "img_align_celeba_89x109_000001-009000.tar"

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The ONNX Runtime runner caches its exports under $XDG_CACHE_HOME (model/runner_onnx.py): tests and the services
# they start use a fresh one, never the user's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="celeba-ddpm-test-cache-")


def make_tiny_weights(path: Path, seed: int = 0, preset: str = "tiny") -> Path:
    torch.manual_seed(seed)
    unet = UNet(PRESETS[preset])
    save_weights(path, unet, ScheduleConfig(), name="tiny-test", dataset="random init (tests)", training_steps=0)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture
def celeba_tar() -> Path:
    """The shared CelebA tar. Absent: skipped on a developer's machine, but a failure in CI (CI=true), which always
    has it, so that a moved file cannot silently turn these tests off."""
    if not CELEBA_TAR.is_file():
        reason = f"CelebA tar not found at {CELEBA_TAR} (see ../shared/data/celeba/README.md)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must have it", pytrace=False)
        pytest.skip(reason)
    return CELEBA_TAR


def needs_celeba():
    return pytest.mark.usefixtures("celeba_tar")
