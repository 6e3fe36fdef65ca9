"""The U-Net on ONNX Runtime's CPU execution provider: exported from the loaded module at start-up, cached on disk.

Why: a small U-Net's CPU step is bound by per-op overhead and thread wake-ups, not arithmetic (the shipped cpu32
model's batch-1 forward does 0.19 GFLOP, ~6% of what 2 cores can do). ONNX Runtime runs the whole graph in C++ with
fused operators and its own thread pool. What it buys, and which thread and shape options won, is measured in
bench/results/runner-cpu.md (bench/runner.py).

- Export: torch.onnx.export of the module (opset 18) with a dynamic batch dimension, once. Sessions for the batch
  sizes up to STATIC_MAX pin that dimension (ORT's free-dimension override) so ORT plans the shapes ahead; larger
  batches share one dynamic session.
- Cache: `<cache dir>/unet-<key>.onnx`, the key a sha256 of the module's parameters and buffers, the torch and
  onnxruntime versions and the opset. Written to a temporary file and renamed (atomic). An entry is trusted only
  after it loads and reproduces the module's output on a probe input; anything else is rebuilt.
- Threads: each session runs single-threaded and the batch is split into one shard per worker, run at once, as the
  TorchScript runner does (ModelRunner calls shards on its pool); spinning is off, so an idle worker sleeps
  instead of taking a core from a busy neighbour. With spinning asked for (ModelRunner's `spin`), a batch with
  fewer rows than cores runs on one session with the spare cores as spinning ORT intra-op threads (`threads=` per
  call; sessions are kept per batch size and thread count): the outputs are the same bits (tests/test_runner.py).
- Chained steps (`steps()`): CHAIN_STEPS denoising steps of one row in one call, the U-Net copied that many times into
  one graph with the update after each copy (model/onnx_chain.py), built on first use from the cached graph as ORT
  optimizes it here (so the copies share its reordered filters), a session per length and thread count. The engine
  uses it where the batch allows (model/engine.py); same images as one call per step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 18
STATIC_MAX = 8  # batch sizes with a session of their own (fixed shapes); above it one dynamic session
CHAIN_STEPS = 10  # steps per call of the unrolled chain (model/onnx_chain.py; bench/results/chain-in-graph-cpu.md)
PROBE_TOL = 1e-4  # a cached graph must reproduce the module to this (fp32; measured 2e-6)


class ChainUnavailable(RuntimeError):
    """The chained-steps graph could not be built, so nothing ran (ModelRunner then stops chaining)."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "celeba-ddpm"


def cache_key(module: nn.Module) -> str:
    import onnxruntime

    h = hashlib.sha256(f"torch={torch.__version__};ort={onnxruntime.__version__};opset={OPSET};".encode())
    for name, tensor in list(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def export(module: nn.Module, path: Path) -> None:
    """Write the module as ONNX with a dynamic batch, atomically (a reader never sees half a file)."""
    cfg = module.config
    x = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.tensor([999.0, 0.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer warnings
            torch.onnx.export(module.eval(), (x, t), tmp, input_names=["x", "t"], output_names=["eps"],
                              dynamic_axes={"x": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class OnnxUNet:
    """`runner(x, t)` == `module(x, t)` for one CPU shard: ONNX Runtime sessions, one per small batch size."""

    def __init__(self, module: nn.Module, cache_dir: Path | None = None, threads: int = 1,
                 static_max: int = STATIC_MAX, spinning: bool = False):
        """threads: ORT intra-op threads per run (1: the caller shards the batch). static_max: batch sizes with
        their own fixed-shape session (0: one dynamic session for all). spinning: ORT's idle threads spin."""
        import onnxruntime as ort

        self.ort = ort
        self.threads, self.static_max, self.spinning = threads, static_max, spinning
        self._lock = threading.Lock()
        self.path = (cache_dir or default_cache_dir()) / f"unet-{cache_key(module)}.onnx"
        self._sessions: dict[tuple, object] = {}
        self._chain_models: dict[int, bytes] = {}  # steps -> the unrolled chain's graph, built on first use
        self._row_graph = None  # what the chains are copied from (_optimized_row_graph), built on first use
        self.shape = (module.config.in_channels, module.config.image_size, module.config.image_size)
        probe = self._probe(module)
        if self.path.exists():
            try:
                self._check(probe)
                log.info("ONNX graph from the cache: %s", self.path)
                return
            except Exception as e:  # corrupt, truncated, or from a different exporter: never trusted
                log.warning("cached ONNX graph %s is unusable (%s); exporting again", self.path, e)
                self._sessions.clear()
        export(module, self.path)
        self._check(probe)
        log.info("exported the U-Net to %s", self.path)

    @staticmethod
    def _probe(module: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = module.config
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        t = torch.tensor([999.0, 500.0, 0.0])
        with torch.inference_mode():
            ref = module.eval()(x, t)
        return x.numpy(), t.numpy(), ref.numpy()

    def _check(self, probe) -> None:
        x, t, ref = probe
        out = self.run(x, t)
        err = float(np.abs(out - ref).max())
        if not err <= PROBE_TOL:
            raise ValueError(f"differs from the module by {err:.2g} (> {PROBE_TOL:g})")

    def _cached(self, key: tuple, build):
        """The session under `key`, built by `build()` once (shards may ask for a new one at once)."""
        s = self._sessions.get(key)
        if s is None:
            with self._lock:
                s = self._sessions.get(key)
                if s is None:
                    s = self._sessions[key] = build()
        return s

    def session(self, batch: int, threads: int | None = None):
        key = (batch if batch <= self.static_max else 0, threads or self.threads)
        return self._cached(key, lambda: self._new_session(*key))

    def chain_session(self, threads: int | None = None, steps: int = CHAIN_STEPS):
        """The session of `steps` unrolled steps for one row, built on first use (model/onnx_chain.py)."""
        key = ("chain", steps, threads or self.threads)
        return self._cached(key, lambda: self._new_chain_session(steps, key[2]))

    def _new_chain_session(self, steps: int, threads: int):
        try:
            if steps not in self._chain_models:
                from .onnx_chain import unrolled_chain

                if self._row_graph is None:
                    self._row_graph = self._optimized_row_graph()
                self._chain_models[steps] = unrolled_chain(self._row_graph, steps, self.shape).SerializeToString()
            return self._new_session(1, threads, self._chain_models[steps])
        except Exception as e:  # a graph ORT will not build: the caller goes on one step per call
            raise ChainUnavailable(f"{type(e).__name__}: {e}") from e

    def _optimized_row_graph(self):
        """The U-Net graph for one row as ONNX Runtime optimizes it on this machine (NCHWc convolutions, their
        filters reordered once): copies made from it share those filters, where copies of the exported graph got a
        reordered set each (+23 vs +14 MB for ten, and slower forwards: model/onnx_chain.py). Kept in memory only:
        the layout it picks depends on this CPU's vector width."""
        import onnx

        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_free_dimension_override_by_name("batch", 1)
        so.log_severity_level = 3  # not its warning that such a file is only for this machine: it never leaves it
        with tempfile.TemporaryDirectory(prefix="celeba-ddpm-") as folder:
            so.optimized_model_filepath = os.path.join(folder, "row.onnx")
            self.ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
            return onnx.load(so.optimized_model_filepath)

    def _new_session(self, batch: int, threads: int, model: bytes | None = None):
        """A session of the U-Net graph, or of `model` (serialized ONNX), with `batch` pinned (0: dynamic)."""
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        if batch:
            so.add_free_dimension_override_by_name("batch", batch)
        return self.ort.InferenceSession(model or str(self.path), so, providers=["CPUExecutionProvider"])

    def run(self, x: np.ndarray, t: np.ndarray, threads: int | None = None) -> np.ndarray:
        return self.session(x.shape[0], threads).run(None, {"x": x, "t": t})[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """threads: ORT intra-op threads for this call (default: the constructor's)."""
        if not x.is_contiguous():  # ONNX Runtime takes NCHW buffers (a call that changes nothing still costs)
            x = x.contiguous()
        if t.dtype != torch.float32:
            t = t.float()
        return torch.from_numpy(self.run(x.numpy(), t.numpy(), threads))

    def steps(self, x: torch.Tensor, coef: torch.Tensor, z: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """K steps of `x <- a x + b unet(x, t) + c z` in one call: x (1, C, H, W), coef (K, 1, 4) = (t, a, b, c),
        z (K, 1, C, H, W); the same as K calls of the U-Net and the update. A graph per K (default CHAIN_STEPS)."""
        if x.shape[0] != 1:
            raise ValueError(f"chained steps run one row per call (ModelRunner shards the batch), not {x.shape[0]}")
        feed = {"x_in": x.contiguous().numpy(), "coef": coef.float().contiguous().numpy(),
                "z": z.contiguous().numpy()}
        return torch.from_numpy(self.chain_session(threads, coef.shape[0]).run(None, feed)[0])
