"""Service configuration: environment variables prefixed CELEBA_DDPM_ (or `python -m service` flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.weights import default_weights


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CELEBA_DDPM_", extra="ignore")

    weights: Path | None = Field(None, description="safetensors weights file (default: the shipped "
                                 "weights/celeba-h200-64.safetensors on CUDA, weights/celeba32-cpu.safetensors on CPU)")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    max_batch: int = Field(16, ge=1, description="most samples denoised together in one step")
    max_n: int = Field(16, ge=1, description="most images in one request")
    queue_size: int = Field(64, ge=1, description="most requests waiting for admission; beyond: 503")
    api_key: SecretStr | None = Field(None, description="if set, the generation and job routes need "
                                      "'Authorization: Bearer <key>'")
    api_keys: SecretStr | None = Field(None, description="several keys, comma-separated (each sees only its own jobs)")
    api_keys_file: Path | None = Field(None, description="a file of keys, one per line (# comments allowed)")
    rate_limit_requests: str | None = Field(None, description="per API key (or client address without keys), e.g. "
                                            "'60/minute': generation requests beyond it get 429 + Retry-After")
    rate_limit_images: str | None = Field(None, description="the same for images (a request of n counts n), e.g. "
                                          "'600/minute'")
    max_jobs: int = Field(1000, ge=1, description="jobs kept at once (queued, running, finished); beyond: 503")
    job_ttl_s: float = Field(600.0, gt=0, description="how long a finished job's results are kept")
    max_steps: int | None = Field(None, ge=1, description="most denoising steps a request may ask for, and the "
                                  "default when lower than the model's T (unset: T, the full chain)")
    request_timeout_s: float | None = Field(None, gt=0, description="default per-request deadline (none: no limit)")
    max_body_bytes: int = Field(4096, ge=256, description="larger request bodies get 413")
    max_upload_bytes: int = Field(20 * 2**20, ge=4096, description="larger bodies to /v1/edits (photos) get 413")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: all cores)")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="auto: channels_last on CPU, contiguous on CUDA (GroupNorm there returns NCHW)")
    runner: Literal["auto", "onnx", "script", "graphs", "eager"] = Field(
        "auto", description="auto: on CPU the U-Net on ONNX Runtime (else frozen TorchScript), one shard per "
        "thread; on CUDA graphs captured per batch-size bucket")
    spin_threads: bool | Literal["auto"] = Field(
        "auto", description="on CPU, a batch with fewer rows than threads runs on ONNX Runtime threads that spin "
        "between ops: 10-35% faster per step at batch 1 when the service owns its cores, 1.1-1.7x slower beside a "
        "busy process; auto: spin while other processes leave this one's cores free (model/runner.py)")
    cache_dir: Path | None = Field(None, description="where the ONNX export of the U-Net is cached (default: "
                                   "$XDG_CACHE_HOME/celeba-ddpm or ~/.cache/celeba-ddpm)")
    malloc_trim_s: float = Field(10.0, ge=0, description="give freed heap memory back to the OS (glibc's "
                                 "malloc_trim) at most this often, in seconds, between steps; 0: never "
                                 "(docs/reliability.md)")
    warmup: bool = Field(True, description="one step at every batch size before reporting ready")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM: time to finish in-flight work")
    limit_concurrency: int | None = Field(1000, ge=1, description="most open connections and tasks; beyond: 503 "
                                          "(uvicorn's limit_concurrency; unset: no limit)")
    timeout_keep_alive: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    replica: str | None = Field(None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                                description="this replica's name, put in front of its job ids (NAME.token) so that a "
                                "load balancer sends a job's requests to the replica that holds it (deploy/nginx); "
                                "e.g. api-0, or the pod IP with dashes on Kubernetes")
    forwarded_allow_ips: str = Field("127.0.0.1", description="proxies whose X-Forwarded-For is trusted for the "
                                     "client address (rate limits, logs): comma-separated IPs or CIDRs, or *")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")

    @field_validator("weights", mode="before")
    @classmethod
    def _empty_is_default(cls, v):
        return None if v == "" else v  # CELEBA_DDPM_WEIGHTS= (compose's unset variable): the shipped default

    def weights_path(self, device) -> Path:
        """The file to serve on `device` (a torch.device): WEIGHTS, else the shipped default for that device."""
        return self.weights or default_weights(device)

    def keys(self) -> list[str]:
        """Every configured API key (API_KEY, API_KEYS and API_KEYS_FILE together); empty: no authentication."""
        keys = [self.api_key.get_secret_value()] if self.api_key else []
        if self.api_keys:
            keys += [k.strip() for k in self.api_keys.get_secret_value().split(",")]
        if self.api_keys_file:
            try:
                text = self.api_keys_file.read_text()
            except OSError as e:
                raise ValueError(f"api_keys_file {self.api_keys_file}: {e.strerror or e}") from e
            keys += [line.split("#")[0].strip() for line in text.splitlines()]
        return [k for k in dict.fromkeys(keys) if k]
