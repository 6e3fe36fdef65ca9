"""Where the model runs: the device, dtype and memory format chosen for it, and the device facts the callers need.

Every CUDA-specific decision lives here, so the engine, the service and training ask one place:
  pick_device         'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a concrete device ('cuda' gets an index: set_device
                      and NCCL need one); an index past the device count is refused now, not at the first kernel
  pick_dtype          'auto' = bf16 where the GPU runs it natively (Ampere and later), fp16 on older GPUs, fp32 on CPU
  pick_memory_format  'auto' = channels_last on CPU (measured faster for eager and TorchScript,
                      bench/results/runner-cpu.md; the engine keeps NCHW where ONNX Runtime runs the U-Net, as it
                      takes NCHW buffers), contiguous on CUDA: GroupNorm there returns NCHW, which costs two
                      transposes per GroupNorm in channels_last, until a GPU measurement says otherwise
  StepTimer           step durations from CUDA events (the host does not wait for the GPU to read them), or the
                      host clock on CPU
  is_device_fault     a sticky device error after which the process must be restarted (not OOM, not a bug)
"""

from __future__ import annotations

import time
from collections import deque

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def pick_device(name: str = "auto") -> torch.device:
    """A concrete device; CUDA devices always carry an index (the current device when none is given)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from e
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"unsupported device {name!r} (expected auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not 0 <= index < count:
        raise ValueError(f"device {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU with native bf16 (emulated bf16 is slow: fp16 then), fp32 on CPU (the ONNX Runtime
    runner is fp32, and many CPUs have no bf16 arithmetic)."""
    if name == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (expected auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def pick_memory_format(name: str, device: torch.device) -> torch.memory_format:
    """'auto': channels_last on CPU, contiguous on CUDA (see the module docstring)."""
    if name == "auto":
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format
    if name not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {name!r} (expected auto, {', '.join(MEMORY_FORMATS)})")
    return MEMORY_FORMATS[name]


def memory_allocated(device: torch.device) -> int:
    """Bytes the caching allocator holds for tensors on `device` (0 on CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def release_cached_memory(device: torch.device) -> None:
    """Return cached blocks to the driver (after an OOM, once the failed step's tensors are gone)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_device_fault(exc: BaseException) -> bool:
    """True for an error that leaves the device unusable (CUDA's sticky errors: illegal address, ECC, launch
    failure, lost device). Out-of-memory is not one: the allocator recovers once the failed step is dropped."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8 raises it for CUDA errors
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "CUDNN_STATUS" in text
                                              or "cuDNN error" in text or "CUBLAS_STATUS" in text)


class StepTimer:
    """Durations of device work without waiting for the device.

    CPU: `start()`/`stop()` read the host clock (the work is done when stop() is called). CUDA: they record events
    on the current stream; `done()` returns the durations of the steps whose end event the GPU has reached, so a
    step's time is reported a step or two late instead of making the host wait for the GPU every step.
    """

    def __init__(self, device: torch.device, keep: int = 64):
        self.cuda = device.type == "cuda"
        self._pending: deque = deque(maxlen=keep)  # on CUDA: (start, end) events not yet read
        self._done: list[float] = []
        self._t0: float | torch.cuda.Event = 0.0

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self._done.append(time.perf_counter() - self._t0)

    def done(self) -> list[float]:
        """Seconds of each finished step since the last call, oldest first."""
        while self._pending and self._pending[0][1].query():
            start, end = self._pending.popleft()
            self._done.append(start.elapsed_time(end) / 1000.0)
        out, self._done = self._done, []
        return out
