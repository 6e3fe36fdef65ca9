"""The sampler engine's contracts: which noise each step uses, and that a failed step can be retried."""

import threading

import numpy as np
import pytest
import torch
from torch import nn

import model.engine as engine_module
from model.diffusion import Diffusion
from model.engine import SampleSpec, SamplerEngine
from model.noise import gaussian
from model.unet import PRESETS, UNet, UNetConfig


class ZeroEps(nn.Module):
    """eps_theta = 0: a ddpm step is then x_next = a x + c z, which exposes the z it used."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.config = UNetConfig(image_size=size, base_channels=8, channel_mult=(1,), num_groups=8)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.zeros_like(x)


def test_noise_index_contract():
    """x_T is noise index 0 of the sample's seed and the z of its k-th step is index k + 1, whenever it joined,
    across the engine's refills of its noise buffer (3 steps per refill here)."""
    d = Diffusion()
    table = d.coefficients("ddpm", 1000).double()
    shape = (3, 4, 4)
    engine = SamplerEngine(ZeroEps(), d, memory_format="contiguous", noise_chunk_elems=3 * 2 * 48)
    engine.add("a", [SampleSpec(5), SampleSpec(2**40 + 3)])
    seeds = {0: 5, 1: 2**40 + 3}
    assert torch.equal(engine.x, gaussian(torch.tensor([5, 2**40 + 3]), torch.zeros(2, dtype=torch.int64), shape))
    for k in range(12):
        if k == 4:  # a late joiner starts at its own step 0 in a batch at step 4
            engine.add("b", [SampleSpec(77)])
            seeds[2] = 77
            assert torch.equal(engine.x[2], gaussian(torch.tensor([77]), torch.tensor([0]), shape)[0])
        x = engine.x.double().clone()
        positions = engine.pos.tolist()
        engine.step()
        for row, pos in enumerate(positions):
            a, c = table[pos, 1], table[pos, 3]
            z = gaussian(torch.tensor([seeds[row]]), torch.tensor([pos + 1]), shape)[0].double()
            torch.testing.assert_close(engine.x[row].double() - a * x[row], c * z, rtol=0, atol=2e-6)


class Fault(RuntimeError):
    pass


@pytest.mark.parametrize("where", ["forward", "after_noise", "finishing"])
def test_a_step_that_fails_can_be_retried_and_gives_the_uninterrupted_images(where, monkeypatch):
    """An error in step k (a CUDA OOM, say), then a retry of step k: the same images as a run without the error.
    'after_noise' fails after the step drew its noise from a fresh refill; 'finishing' fails while handing out
    the finished images."""
    torch.manual_seed(0)
    unet, d = UNet(PRESETS["tiny"]), Diffusion()
    specs = [SampleSpec(1), SampleSpec(2, "dpm-solver++", 6), SampleSpec(3, "ddim", 9)]

    def run(fail_at: int | None):
        engine = SamplerEngine(unet, d, noise_chunk_elems=3 * 3 * 192)  # refills every 3 steps
        engine.add("g", specs[:2])
        engine.add("h", specs[2:])
        state = {"k": 0, "failed": False}

        def should_fail():
            if state["k"] == fail_at and not state["failed"]:
                state["failed"] = True
                raise Fault(f"injected at step {fail_at}")

        if where == "forward":
            real_runner = engine.runner
            engine.runner = lambda x, t: (should_fail(), real_runner(x, t))[1]
        elif where == "after_noise":
            real_noise = engine._noise
            engine._noise = lambda *need: (real_noise(*need), should_fail())[0]
        else:
            real_to_uint8 = engine_module.to_uint8
            monkeypatch.setattr(engine_module, "to_uint8", lambda x: (should_fail(), real_to_uint8(x))[1])
        out = {}
        while len(engine):
            try:
                finished = engine.step().finished
            except Fault:
                continue  # retry the same step
            for group, index, img in finished:
                out[group, index] = img
            state["k"] += 1
        assert state["failed"] == (fail_at is not None)
        return out

    reference = run(None)
    fail_at = {"forward": 3, "after_noise": 6, "finishing": 5}[where]  # 6: a refill; 5: dpm-solver++ ends
    retried = run(fail_at)
    assert sorted(retried) == sorted(reference) == [("g", 0), ("g", 1), ("h", 0)]
    for key in reference:
        assert np.array_equal(retried[key], reference[key]), key


def test_big_batches_draw_their_noise_during_the_forward_with_the_same_bits(monkeypatch):
    """From NOISE_AHEAD_ROWS rows on CPU a step's noise is drawn on a helper thread while the U-Net runs: the same
    images as drawn after it, and a failure there fails the step, whose retry gives the same images."""
    torch.manual_seed(0)
    unet, d = UNet(PRESETS["tiny"]), Diffusion()
    rows = engine_module.NOISE_AHEAD_ROWS
    threads = []
    real_gaussian = engine_module.gaussian
    monkeypatch.setattr(engine_module, "gaussian",
                        lambda *a: (threads.append(threading.current_thread().name), real_gaussian(*a))[1])

    def run(ahead: bool, fail_at: int | None = None):
        monkeypatch.setattr(engine_module, "NOISE_AHEAD_ROWS", rows if ahead else 10**9)
        engine = SamplerEngine(unet, d, noise_chunk_elems=rows * 192 * 3)  # refills every 3 steps
        engine.add("g", [SampleSpec(s, "ddpm", 10) for s in range(rows)])
        real_noise, k = engine._noise, 0

        def failing_noise(need=1):  # fails once, at step fail_at, wherever it runs; then the real one again
            if k == fail_at:
                del engine._noise
                raise ZeroDivisionError("injected")
            return real_noise(need)

        if fail_at is not None:
            engine._noise = failing_noise
        threads.clear()
        out, failures = {}, 0
        while len(engine):
            try:
                step = engine.step()
            except ZeroDivisionError:
                failures += 1
                continue  # the retry
            out.update({index: img for _, index, img in step.finished})
            k += 1
        assert failures == (fail_at is not None)
        return np.stack([out[i] for i in range(rows)]), threads[1:]  # threads[0]: x_T, drawn by add()

    drawn_after, where = run(False)
    assert where and set(where) == {"MainThread"}
    drawn_ahead, where = run(True)
    assert where and all(name.startswith("noise") for name in where)
    assert np.array_equal(drawn_ahead, drawn_after)
    retried, _ = run(True, fail_at=3)  # step 3 refills the noise
    assert np.array_equal(retried, drawn_after)


def test_clear_empties_the_batch_without_device_work():
    torch.manual_seed(0)
    engine = SamplerEngine(UNet(PRESETS["tiny"]), Diffusion())
    engine.add("g", [SampleSpec(1), SampleSpec(2)])
    engine.step()
    engine.clear()
    assert len(engine) == 0 and engine.x.shape[0] == 0 and engine.groups() == set()
    engine.add("h", [SampleSpec(3, "ddim", 2)])
    assert engine.step().finished == [] and [g for g, _, _ in engine.step().finished] == ["h"]


def test_the_engine_on_a_gpus_noise_path_makes_the_cpus_images(monkeypatch):
    """What the engine does differently off the CPU in pure torch, run on the CPU: Philox's rounds in torch ops
    (model/noise.py) and CUDA's noise chunk (4M values a call, not 256k); the 1000-step ddpm chain gives the same
    PNG bytes. (Pinned host copies, CUDA graphs and event timing need a real GPU: tests/test_cuda.py.)"""
    from model.engine import generate
    torch.manual_seed(0)
    unet, d = UNet(PRESETS["tiny"]), Diffusion()
    seeds = [0, 7, 2**32 + 5, 2**63 - 1]
    reference = generate(SamplerEngine(unet, d), seeds, "ddpm", 1000, 4)
    monkeypatch.setattr(engine_module, "gaussian", lambda *a: gaussian(*a, philox_ops="torch"))
    gpu_like = generate(SamplerEngine(unet, d, noise_chunk_elems=1 << 22), seeds, "ddpm", 1000, 4)
    assert np.array_equal(reference, gpu_like)
