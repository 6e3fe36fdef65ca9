"""The U-Net forward as CUDA graph replays, one graph per batch-size bucket.

A forward is hundreds of small kernels (591 ATen ops for celeba64, 299 for cpu32: model/runner.py); eager PyTorch
launches each from Python, so at small batches the host, not the GPU, sets the step time. A CUDA graph records the
launches once and replays them all with one call. A graph has fixed shapes and addresses, so each bucket owns
static input and output tensors: a call copies its batch into the bucket's input (rows past the batch keep
whatever they held: the U-Net treats every row on its own, so they change nothing of the others), replays, and
returns a copy of the rows it was asked for.

Buckets: every size up to 8, multiples of 8 up to 64, then multiples of 32, up to `max_batch`; so a batch
computes at most 1/8 (past 8) of padding rows. Larger batches run eagerly. Graphs are captured when a
bucket is first used (the service warms every batch size up at start, so none is captured while serving), all
into one memory pool: they replay one at a time on one stream, so their intermediate buffers can be shared.

Capture failing with out-of-memory is raised (the caller halves its batch, as for any OOM); any other capture
failure switches this runner to eager for good and says so (`eager_reason`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

MAX_BATCH = 256


def bucket(n: int) -> int:
    """The graph batch size that runs a batch of n (n <= 8: n; <= 64: next multiple of 8; else of 32)."""
    if n < 1:
        raise ValueError(f"batch size must be at least 1, got {n}")
    if n <= 8:
        return n
    step = 8 if n <= 64 else 32
    return -(-n // step) * step


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor):
        self.graph, self.x, self.t, self.out = graph, x, t, out


class CudaGraphUNet:
    """`fn(x, t)` == `module(x, t)` for x on a CUDA device, replayed from graphs. Holds the module's weights by
    reference: the graphs read the parameters' memory, so load new weights in place (copy_) or build a new one."""

    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.contiguous_format, max_batch: int = MAX_BATCH,
                 warmup_iters: int = 2):
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.module, self.device, self.dtype, self.memory_format = module, device, dtype, memory_format
        self.max_batch, self.warmup_iters = max_batch, warmup_iters
        cfg = module.config
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.graphs: dict[int, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.eager_reason: str | None = None

    def _capture(self, b: int) -> _Graph:
        x = torch.zeros(b, *self.shape, device=self.device, dtype=self.dtype).contiguous(
            memory_format=self.memory_format)
        t = torch.full((b,), 500.0, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: cuDNN/cuBLAS pick kernels, lazy init happens
            for _ in range(self.warmup_iters):
                self.module(x, t)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (the service's HTTP side) may touch CUDA while this one captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.module(x, t)
        return _Graph(graph, x, t, out)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.eager_reason is not None or n > self.max_batch or n == 0:
            return self.module(x, t)
        b = bucket(n)
        g = self.graphs.get(b)
        if g is None:
            try:
                g = self.graphs[b] = self._capture(b)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # a module or driver that cannot be captured: eager from now on
                self.eager_reason = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed at batch %d (%s); running the U-Net eagerly", b,
                            self.eager_reason)
                return self.module(x, t)
        g.x[:n].copy_(x)
        g.t[:n].copy_(t)
        g.graph.replay()
        return g.out[:n].clone()  # the static output is overwritten by the next replay
