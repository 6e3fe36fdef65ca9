# celeba-ddpm on a GPU host: `docker compose up` (see docker-compose.yml and README "GPU host").
# A CUDA-enabled PyTorch base image, pinned; the project installed with its `serve` extra; non-root.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE \
    CELEBA_DDPM_WEIGHTS=/app/weights/celeba32-cpu.safetensors \
    CELEBA_DDPM_HOST=0.0.0.0 \
    CELEBA_DDPM_PORT=8000

WORKDIR /app
COPY pyproject.toml README.md ./
COPY deploy/install.sh ./deploy/install.sh
COPY model ./model
COPY service ./service
COPY train ./train
RUN sh deploy/install.sh /app

# The shipped weights; mount others and point CELEBA_DDPM_WEIGHTS at them to override.
COPY weights ./weights
RUN useradd --create-home --uid 10001 ddpm
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"]
CMD ["python", "-m", "service"]
