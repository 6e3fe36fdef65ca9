"""The model runner: the engine's one call into the U-Net, made as fast as the device allows.

On CPU a small U-Net's step is not all convolution: it is bound by per-op overhead and thread wake-ups. Measured on
2 cores with the shipped cpu32 model (bench/results/runner-backends-cpu.md, bench/results/runner-cpu.md):
  - Python dispatch: eager PyTorch spends ~6 of the 16 ms of a batch-1 forward calling ~170 small ops from
    Python. A compiled graph runs them from C++: ONNX Runtime (model/runner_onnx.py, fused operators, shapes
    planned per batch size) or a frozen TorchScript trace.
  - Intra-op threads: the ops are too small for two threads to share well. Splitting the batch into one shard per
    core, each run single-threaded and all at once, keeps every core busy with whole ops.
The default on CPU (`auto`, fp32) is ONNX Runtime in shards: about 2x the TorchScript runner at batch 1 and
1.1-1.5x at 4-64, which itself is 1.2-1.6x eager; the same numbers to ~1e-6 (tests/test_runner.py). The choice is
fixed, not timed at start-up, so that the CLI and the service run the same kernels and give the same PNGs.
  - Spinning threads (`spin`): a batch of fewer rows than cores leaves cores idle; with spin, those rows run on an
    ORT session with a spinning intra-op thread per core instead (batch 1 on 2 cores: 10-35% faster per step
    alone, 1.1-1.7x slower beside a busy process: bench/results/thread-policy-cpu.md). `spin="auto"` (the
    service's default) spins only while other work used less than SPIN_IDLE_BELOW cores of this process's CPUs
    over the last half second (model/cpu_load.py), so a lone request gets the spare cores when they are free and
    the single-threaded shards when they are not. The outputs are the same bits either way. torch's own OpenMP
    pool stays PASSIVE: with OMP_WAIT_POLICY=ACTIVE its spinning threads take the cores from ORT's and every step
    got 1.4-1.7x slower (measured at batch 1-64).
  - Chained steps (`steps()`, onnx only): with at most `workers` rows, one row per shard, CHAIN_STEPS steps per
    call, no Python between their forwards (model/onnx_chain.py): the torch calls around each forward cost about a
    millisecond on a shared VM (their code goes cold while the forward runs). 1000-step ddpm chain at batch 1, same
    pixels: bench/results/chain-in-graph-cpu.md.
Where onnxruntime or the export is unavailable the runner falls back to TorchScript, then eager, and says so
(`mode`, shown in /v1/model and the model_info metric).

Why not torch.compile: it takes 60-140 s per batch shape on 2 cores and recompiles as the batch size changes;
torch.export / FX still run every op from Python. TorchScript is deprecated; where torch.jit is gone the script
runner falls back to eager.

On CUDA an eager forward is launch-bound at small batches, not GPU-bound: a cpu32 forward dispatches 299 ATen ops
and a celeba64 one 591 (counted with a TorchDispatchMode on CPU; about one kernel launch each on CUDA), so at batch 1
the host's few microseconds per launch, not the GPU, sets the step time. The default on CUDA (`auto`) is therefore
`graphs`: the forward replayed from CUDA graphs captured per batch-size bucket (model/runner_cuda.py), falling back
to eager where capture fails. Measured against eager on an H200 (bench/results/sampler-h200-bf16.md, bf16,
celeba64): 3.8x at batch 1, 2.8x at 4, 1.6x at 16, 1.05x at 64.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .cpu_load import OtherLoad
from .mp_unet import Baked
from .runner_onnx import CHAIN_STEPS, ChainUnavailable
from .unet import UNet

log = logging.getLogger(__name__)

MODES = ("auto", "onnx", "script", "graphs", "eager")
SPIN_IDLE_BELOW = 0.25  # spin="auto": spin while other work used less than this many cores (model/cpu_load.py)


class ModelRunner:
    """`runner(x, t)` == `module(x, t)`, faster. mode: 'auto' (on CPU, a UNet in fp32 runs on ONNX Runtime where
    it is installed, else TorchScript; on CUDA, graphs), 'onnx' and 'script' (CPU only, each falling back to the
    next: onnx, script, eager), 'graphs' (CUDA only; eager for a batch it cannot capture), 'eager'.
    workers: CPU shards run at once (default: torch's intra-op thread count).
    cache_dir, static_max: for onnx (model/runner_onnx.py). spin: for onnx, let a batch smaller than `workers` use
    the spare cores as spinning intra-op threads: True (a process that owns its cores), False, or "auto" (while no
    other work is using them). `mode` says what runs.
    An onnx or script runner holds the weights as they were when it was built: build a new one after changing them."""

    def __init__(self, module: nn.Module, device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.contiguous_format, mode: str = "auto",
                 workers: int | None = None, cache_dir: Path | None = None, static_max: int | None = None,
                 spin: bool | str = False):
        if mode not in MODES:
            raise ValueError(f"unknown runner mode {mode!r} (expected one of {', '.join(MODES)})")
        if spin not in (True, False, "auto"):
            raise ValueError(f"spin must be True, False or 'auto', not {spin!r}")
        if mode in ("onnx", "script") and device.type != "cpu":
            raise ValueError(f"runner mode {mode!r} is for CPU; CUDA runs eager")
        if mode == "graphs" and device.type != "cuda":
            raise ValueError("runner mode 'graphs' is for CUDA; CPU runs onnx, script or eager")
        if mode == "auto":
            # Only our own U-Nets are known to trace into a batch-size-independent graph (tests/test_runner.py).
            compiled = "onnx" if dtype == torch.float32 else "script"
            if not isinstance(module, (UNet, Baked)):
                mode = "eager"
            else:
                mode = compiled if device.type == "cpu" else "graphs"
        if mode == "onnx" and dtype != torch.float32:
            raise ValueError("runner mode 'onnx' runs fp32 (ONNX Runtime's CPU kernels)")
        self.workers = max(1, workers or torch.get_num_threads())
        self.spin = spin
        self.other_load = OtherLoad() if spin == "auto" else None
        self.mode = "eager"
        self.fn = module
        if mode == "onnx":
            try:
                from .runner_onnx import STATIC_MAX, OnnxUNet

                self.fn = OnnxUNet(module, cache_dir, threads=1, spinning=bool(self.spin),
                                   static_max=STATIC_MAX if static_max is None else static_max)
                self.mode = "onnx"
            except ImportError as e:
                log.warning("onnxruntime is not installed (%s); trying TorchScript", e)
                mode = "script"
            except Exception as e:  # an export or session ORT cannot build: say so and go on
                log.warning("ONNX Runtime runner unavailable (%s: %s); trying TorchScript", type(e).__name__, e)
                mode = "script"
        if mode == "graphs":
            from .runner_cuda import CudaGraphUNet

            self.fn = CudaGraphUNet(module, device, dtype, memory_format)
            self.mode = "graphs"
        if mode == "script":
            try:
                self.fn = _freeze_trace(module, device, dtype, memory_format)
                self.mode = "script"
            except (AttributeError, RuntimeError) as e:  # torch.jit removed, or a graph it cannot trace
                log.warning("TorchScript trace failed (%s); running the U-Net eagerly", e)
        # Batches of at most `workers` rows may run CHAIN_STEPS steps per call, one row per shard (steps()).
        self.chain_steps = CHAIN_STEPS if self.mode == "onnx" else 0
        # Shards run on this pool (its threads start on first use). Each worker's OpenMP thread count is its own:
        # 1, so the shards share the cores, not each op (ONNX Runtime's sessions are single-threaded likewise).
        self._pool = None
        if self.mode in ("onnx", "script") and self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="unet-shard",
                                            initializer=torch.set_num_threads, initargs=(1,))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shards = min(self.workers, x.shape[0]) if self._pool is not None else 1
        threads = self._threads(shards)
        if shards <= 1:
            return self._call(x, t, threads)
        parts = [self._pool.submit(self._on_shard, self._call, xs, ts, threads)
                 for xs, ts in zip(x.tensor_split(shards), t.tensor_split(shards))]
        return torch.cat([p.result() for p in parts])

    def _threads(self, shards: int) -> int:
        """ORT threads per shard: the cores left over by too few rows become each shard's spinning threads, where
        spinning is allowed (with "auto": while other work leaves them free)."""
        if not self.spin or self.mode != "onnx" or shards >= self.workers:
            return 1
        if self.other_load is not None and not self.cores_free():
            return 1
        return self.workers // shards

    def cores_free(self) -> bool:
        """Whether other work used less than SPIN_IDLE_BELOW cores of ours over the last window (False while
        unknown)."""
        load = self.other_load.cores() if self.other_load is not None else None
        return load is not None and load < SPIN_IDLE_BELOW

    def build_spinning_sessions(self) -> None:
        """With spin="auto", build the spinning sessions that a batch smaller than the cores may switch to (one row
        per shard on workers // rows threads, and its chained steps), so that none is built while serving: the
        service's warm-up calls this."""
        if self.spin != "auto" or self.mode != "onnx":
            return
        for threads in {self.workers // rows for rows in range(1, self.workers)} - {1}:
            self.fn.session(1, threads)
            if self.chain_steps > 1:
                try:
                    self.fn.chain_session(threads, self.chain_steps)
                except ChainUnavailable:  # steps() says so and stops chaining when it first needs it
                    pass

    def can_chain(self, batch: int) -> bool:
        """Whether steps() takes a batch of this many rows."""
        return self.chain_steps > 1 and 1 <= batch <= self.workers

    def steps(self, x: torch.Tensor, coef: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """K steps of `x <- a x + b unet(x, t) + c z` in one call per row (model/onnx_chain.py): x (B, C, H, W),
        coef (K, B, 4) = (t, a, b, c), z (K, B, C, H, W), B <= workers; the engine asks for K = chain_steps (a
        benchmark may set another). Each row is a shard of its own, with the spare cores as its spinning threads
        where spinning is allowed."""
        if not self.can_chain(x.shape[0]):
            raise ValueError(f"steps() takes 1 to {self.workers} rows on an onnx runner, not {x.shape[0]} "
                             f"({self.mode} runner)")
        rows = x.shape[0]
        threads = self._threads(rows)
        try:
            if rows == 1:
                return self.fn.steps(x, coef, z, threads)
            parts = [self._pool.submit(self._on_shard, self.fn.steps, x[i:i + 1], coef[:, i:i + 1], z[:, i:i + 1],
                                       threads) for i in range(rows)]
            return torch.cat([p.result() for p in parts])
        except ChainUnavailable as e:  # say so once, and chain no more (the engine then takes one step per call)
            log.warning("chained steps unavailable (%s); one U-Net call per step from now on", e)
            self.chain_steps = 0
            raise

    def _call(self, x: torch.Tensor, t: torch.Tensor, threads: int) -> torch.Tensor:
        return self.fn(x, t, threads) if threads > 1 else self.fn(x, t)

    @staticmethod
    def _on_shard(fn, *args) -> torch.Tensor:
        """fn(*args) on a pool thread, in inference mode (grad mode is per thread)."""
        with torch.inference_mode():
            return fn(*args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _freeze_trace(module: nn.Module, device: torch.device, dtype: torch.dtype,
                  memory_format: torch.memory_format) -> torch.jit.ScriptModule:
    cfg = module.config
    x = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    t = torch.tensor([999.0, 0.0], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # F.group_norm checks in Python that each group has more than one value; the trace keeps the check's
        # outcome as a constant, which is true at every batch size (it depends on channels and H*W only).
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning)
        with torch.inference_mode():
            traced = torch.jit.trace(module.eval(), (x, t), check_trace=False)
            return torch.jit.freeze(traced.eval())
