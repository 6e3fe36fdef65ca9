"""Device, dtype and memory-format choices, device faults and step timing, with CUDA faked on this CPU machine."""

import subprocess
import sys

import pytest
import torch

from model import device as dev
from train.train import resolve_device

from conftest import ROOT


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine with cuda:0 and cuda:1, current device 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cuda_devices_always_get_an_index(two_gpus, monkeypatch):
    # torch.cuda.set_device(torch.device("cuda")) raises "Expected a torch.device with a specified index"
    assert dev.pick_device("auto") == torch.device("cuda", 0)
    assert dev.pick_device("cuda") == torch.device("cuda", 0)
    assert dev.pick_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # e.g. after torch.cuda.set_device(1)
    assert dev.pick_device("cuda") == torch.device("cuda", 1)
    assert dev.pick_device("cpu") == torch.device("cpu")


def test_a_device_the_machine_lacks_is_refused_at_once(two_gpus, monkeypatch):
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1"):
        dev.pick_device("cuda:2")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        dev.pick_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        dev.pick_device("cuda")
    assert dev.pick_device("auto") == torch.device("cpu")


def test_training_device_under_torchrun_and_alone(two_gpus):
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert resolve_device("auto", torchrun) == torch.device("cuda", 1)
    assert resolve_device("cuda", torchrun) == torch.device("cuda", 1)
    assert resolve_device("cpu", torchrun) == torch.device("cpu")
    assert resolve_device("auto", {}) == torch.device("cuda", 0)  # alone: an index, not bare "cuda"
    assert resolve_device("cuda", {}).index == 0
    with pytest.raises(ValueError, match="cuda:0 to cuda:1"):
        resolve_device("auto", {"RANK": "5", "WORLD_SIZE": "6", "LOCAL_RANK": "5"})


def test_cli_refuses_a_missing_device_naming_it(tmp_path, tiny_weights):
    r = subprocess.run([sys.executable, "-m", "service", "--weights", str(tiny_weights), "--device", "cuda:3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "device 'cuda:3'" in r.stderr and "Traceback" not in r.stderr


def test_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    cuda = torch.device("cuda", 0)
    for native, expected in ((True, torch.bfloat16), (False, torch.float16)):
        # pre-Ampere GPUs "support" bf16 by emulation: counted unless including_emulation=False
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native: native or including_emulation)
        assert dev.pick_dtype("auto", cuda) == expected
    assert dev.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert dev.pick_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        dev.pick_dtype("fp8", cuda)


def test_memory_format_auto_is_channels_last_on_cpu_only():
    assert dev.pick_memory_format("auto", torch.device("cpu")) == torch.channels_last
    assert dev.pick_memory_format("auto", torch.device("cuda", 0)) == torch.contiguous_format
    assert dev.pick_memory_format("channels_last", torch.device("cuda", 0)) == torch.channels_last
    with pytest.raises(ValueError, match="unknown memory format"):
        dev.pick_memory_format("nhwc", torch.device("cpu"))


def test_device_faults_are_told_apart_from_oom_and_bugs():
    assert dev.is_device_fault(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert dev.is_device_fault(RuntimeError("CUDA error: unspecified launch failure"))
    assert dev.is_device_fault(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert not dev.is_device_fault(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not dev.is_device_fault(RuntimeError("shape '[2, 3]' is invalid for input of size 7"))
    assert not dev.is_device_fault(ValueError("CUDA error in a message of the wrong type"))


class FakeEvent:
    """torch.cuda.Event without a GPU: reached when the test says so; no synchronize() to call."""
    reached = False
    clock = 0.0

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        FakeEvent.clock += 0.004
        self.t = FakeEvent.clock

    def query(self):
        return FakeEvent.reached

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0  # milliseconds, like CUDA's


def test_step_timer_reads_cuda_events_without_waiting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = dev.StepTimer(torch.device("cuda", 0))
    for _ in range(3):
        timer.start()
        timer.stop()
    assert timer.done() == []  # the GPU has not reached the end events yet: nothing reported, nothing waited for
    FakeEvent.reached = True
    assert timer.done() == pytest.approx([0.004] * 3)
    assert timer.done() == []
    cpu = dev.StepTimer(torch.device("cpu"))
    cpu.start()
    cpu.stop()
    (dt,) = cpu.done()
    assert 0 <= dt < 1
