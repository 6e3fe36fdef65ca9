import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from service_helpers import exported_series


def test_dockerfile_runs_the_install_script_and_is_production_shaped():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}$", text, re.M)  # pinned tag and digest
    # the image's torch is the one CI installs (and every test here runs)
    ci_torch = re.search(r"pip install -q (torch==[\d.]+)", (ROOT / ".ci" / "run").read_text())[1]
    assert f"RUN pip install --no-cache-dir {ci_torch}\n" in text
    assert "RUN sh deploy/install.sh /app" in text
    assert re.search(r"^USER \d+$", text, re.M) and "EXPOSE 8000" in text and "HEALTHCHECK" in text
    assert '/healthz' in text and 'CMD ["python", "-m", "service"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv*", "runs", "data", ".git"} <= set(ignored)


def test_install_steps_of_the_dockerfile_work_in_a_fresh_virtualenv(tmp_path):
    """The Dockerfile's install step (deploy/install.sh) on a copy of the project, in a new venv whose torch
    plays the part of the base image's."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv*", "runs", ".git", "__pycache__", "*.egg-info",
                                                              ".pytest_cache", "build"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        pytest.fail(f"installing torch==2.13.0 in a fresh venv failed:\n{r.stderr[-2000:]}")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run(["sh", "deploy/install.sh", str(src)], cwd=src, capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "celeba-ddpm installed" in r.stdout
    r = subprocess.run([str(py), "-m", "service", "--help"], cwd=tmp_path, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "CELEBA_DDPM_WEIGHTS" in r.stdout


def _dashboard_exprs() -> list[str]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "celeba-ddpm.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_grafana_dashboard_queries_only_metrics_the_service_exports():
    exported = exported_series()
    used = {m for e in _dashboard_exprs() for m in re.findall(r"\bceleba_ddpm_\w+", e)}
    assert used and used <= exported, used - exported
    # the dashboard's panels cover throughput, latency, errors and saturation
    assert {"celeba_ddpm_images_generated_total", "celeba_ddpm_http_request_duration_seconds_bucket",
            "celeba_ddpm_rejected_requests_total", "celeba_ddpm_queue_depth_requests"} <= used


def test_compose_provisions_grafana_with_the_dashboard():
    compose = (ROOT / "docker-compose.yml").read_text()
    assert re.search(r"image: grafana/grafana:\d+\.\d+\.\d+", compose)
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards:ro" in compose
    provider = (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "celeba-ddpm.yml").read_text()
    assert "path: /etc/grafana/dashboards" in provider
    source = (ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "url: http://prometheus:9090" in source and "uid: prometheus" in source
