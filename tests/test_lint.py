"""The tree passes ruff's pyflakes and pycodestyle rules (pyproject.toml [tool.ruff]): no unused or undefined
names, no lines over 120 characters."""

import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGES = ["model", "service", "train", "bench", "tests"]


def test_the_tree_passes_ruff():
    try:
        import ruff  # noqa: F401  (the dev extra installs it)
    except ImportError:
        if not shutil.which("ruff"):
            pytest.skip("ruff is not installed (pip install -e '.[dev]')")
        cmd = ["ruff"]
    else:
        cmd = [sys.executable, "-m", "ruff"]
    r = subprocess.run(cmd + ["check", "--output-format", "concise", *PACKAGES], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
