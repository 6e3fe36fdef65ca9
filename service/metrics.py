"""Prometheus metrics (base units, _total counters, no per-seed labels), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

disable_created_metrics()  # no *_created series: they double the exposition and dashboards don't use them

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        p = "celeba_ddpm_"
        self.requests = Counter(p + "http_requests", "HTTP requests by endpoint, method and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.request_duration = Histogram(p + "http_request_duration_seconds", "HTTP request duration",
                                          ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter(p + "rejected_requests", "Generation requests refused, by reason", ["reason"],
                                registry=r)
        self.cancelled = Counter(p + "cancelled_requests", "Accepted requests dropped before finishing, by reason",
                                 ["reason"], registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Time from acceptance to the first denoising step",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.generation = Histogram(p + "generation_duration_seconds", "Time from first step to last image",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge(p + "queue_depth_requests", "Requests waiting for admission", registry=r)
        self.queued_samples = Gauge(p + "queued_samples", "Samples of waiting requests not yet in the batch",
                                    registry=r)
        self.active = Gauge(p + "active_samples", "Samples in the running batch", registry=r)
        self.batch_size = Histogram(p + "batch_size_samples", "Samples per denoising step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.batch_limit = Gauge(p + "batch_limit_samples", "Current batch-size limit (lowered after GPU OOM)",
                                 registry=r)
        self.steps = Counter(p + "denoising_steps", "Batched U-Net forward passes (denoising steps)", registry=r)
        self.sample_steps = Counter(p + "sample_denoising_steps", "Per-sample denoising steps", registry=r)
        self.images = Counter(p + "images_generated", "Images generated", registry=r)
        self.step_duration = Histogram(p + "step_duration_seconds", "Duration of one denoising step of the batch",
                                       buckets=STEP_BUCKETS, registry=r)
        self.oom = Counter(p + "out_of_memory_errors", "GPU out-of-memory errors in a denoising step", registry=r)
        self.gpu_memory = Gauge(p + "gpu_memory_allocated_bytes", "GPU memory allocated by torch (0 on CPU)",
                                registry=r)
        self.model = Info(p + "model", "The served model", registry=r)
        self.jobs = Gauge(p + "jobs", "Jobs in the store by state (queued, running, and finished ones not yet expired)",
                          ["state"], registry=r)
        self.event_streams = Gauge(p + "open_event_streams", "Open Server-Sent Event streams of jobs", registry=r)
        self.previews = Counter(p + "previews_sent", "Preview images sent on event streams", registry=r)
        self.non_finite = Counter(p + "non_finite_samples", "Samples that came out NaN or Inf (their request failed)",
                                  registry=r)
