# celeba-ddpm on a GPU host: `docker compose up` (see docker-compose.yml and README "GPU host").
# The image runs the torch every test here runs (2.13.0, as .ci/run installs): a slim Python base, pinned by tag and
# digest, plus PyPI's torch wheel, which on Linux x86_64 is the CUDA build and brings its CUDA runtime libraries as
# nvidia-* wheels. The host's driver comes in through the NVIDIA container toolkit, so no CUDA base image is needed.
# Expected size: ~6 GB, nearly all of it torch's CUDA build (a CUDA torch 2.14.1 venv measured 5.6 GB on this
# project's machines), the rest Python (~130 MB), the project and its serve extra (~200 MB) and the weights.
# The digest is python:3.11-slim-bookworm's multi-platform index as a public Dockerfile recorded it from Docker Hub on
# 2026-04-06 (this project's machines cannot reach registries to check it); refresh it with
# `docker buildx imagetools inspect python:3.11-slim-bookworm`.
FROM python:3.11-slim-bookworm@sha256:420310dd2ff7895895f0f1f9d15cae5a95dabceb8f1d6b9a23ef33c2c1c542c3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE \
    CELEBA_DDPM_HOST=0.0.0.0 \
    CELEBA_DDPM_PORT=8000

WORKDIR /app
# torch alone first: the big layer, cached across rebuilds of the project.
RUN pip install --no-cache-dir torch==2.13.0
COPY pyproject.toml README.md ./
COPY deploy/install.sh ./deploy/install.sh
COPY model ./model
COPY service ./service
COPY train ./train
RUN sh deploy/install.sh /app

# The shipped weights: with CELEBA_DDPM_WEIGHTS unset the service serves weights/celeba-h200-64.safetensors (64x64)
# on a GPU and weights/celeba32-cpu.safetensors on CPU; mount others and point CELEBA_DDPM_WEIGHTS at them.
COPY weights ./weights
RUN useradd --create-home --uid 10001 ddpm
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["python", "-m", "service"]
