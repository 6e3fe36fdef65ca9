"""celeba-ddpm's HTTP service: FastAPI, a step-level continuous-batching scheduler, Prometheus metrics."""
