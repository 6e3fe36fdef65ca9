"""The model runner computes what the module computes, at every batch size, without taking the process's threads."""

import copy
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.diffusion import Diffusion
from model.engine import SampleSpec, SamplerEngine, generate
from conftest import nearly_equal
from model import runner_onnx
from model.runner import ModelRunner
from model.runner_onnx import OnnxUNet
from model.unet import PRESETS, UNet

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(3)
    return UNet(PRESETS["tiny"]).eval().to(memory_format=torch.channels_last)


def _inputs(b: int, size: int = 8):
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (b,), generator=g).float()
    return x, t


@pytest.mark.parametrize("mode", ["script", "onnx"])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_compiled_runners_match_the_module_at_every_batch_size(unet, mode, workers, tmp_path):
    """script: traced at batch 2; onnx: fixed-shape sessions up to STATIC_MAX (8), one dynamic session beyond. Run
    at other sizes, in shards of uneven size (5 rows over 3 workers: 2, 2, 1)."""
    runner = ModelRunner(unet, CPU, torch.float32, torch.channels_last, mode, workers, cache_dir=tmp_path)
    assert runner.mode == mode
    with torch.inference_mode():
        for b in (1, 2, 3, 5, 8, 9, 20):
            x, t = _inputs(b)
            out = runner(x, t)
            assert out.shape == (b, 3, 8, 8)
            torch.testing.assert_close(out, unet(x, t), rtol=1e-5, atol=1e-5, check_stride=False)
    runner.close()


def test_auto_mode_compiles_only_our_unet_on_cpu(unet):
    assert ModelRunner(unet, CPU, torch.float32).mode == "onnx"
    bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    assert ModelRunner(bf16, CPU, torch.bfloat16).mode == "script"  # the ONNX runner is fp32 only

    class Other(nn.Module):
        def forward(self, x, t):
            return x * 0.5

    other = Other()
    runner = ModelRunner(other, CPU, torch.float32)
    assert runner.mode == "eager" and runner.fn is other
    assert ModelRunner(unet, CPU, torch.float32, mode="eager").mode == "eager"


def test_shards_run_at_once_on_the_pool(unet):
    """A batch of 2+ is split into one shard per worker, each run on the pool's threads; batch 1 stays on the
    caller's thread."""
    runner = ModelRunner(unet, CPU, torch.float32, torch.channels_last, "script", workers=2)
    calls, both_inside = [], threading.Barrier(2, timeout=10)
    traced = runner.fn

    def spy(x, t):
        calls.append((threading.current_thread().name, x.shape[0]))
        if x.shape[0] == 3 or x.shape[0] == 2:
            both_inside.wait()  # both shards are running at the same time, or this times out
        return traced(x, t)

    runner.fn = spy
    with torch.inference_mode():
        out = runner(*_inputs(5))
        assert out.shape == (5, 3, 8, 8)
        assert sorted(n for _, n in calls) == [2, 3] and all(name.startswith("unet-shard") for name, _ in calls)
        calls.clear()
        runner(*_inputs(1))
    assert calls == [(threading.current_thread().name, 1)]
    runner.close()


def test_bad_modes_are_refused(unet):
    with pytest.raises(ValueError, match="unknown runner mode 'fast'"):
        ModelRunner(unet, CPU, torch.float32, mode="fast")
    with pytest.raises(ValueError, match="'script' is for CPU"):
        ModelRunner(unet, torch.device("cuda"), torch.float32, mode="script")
    with pytest.raises(ValueError, match="'onnx' runs fp32"):
        ModelRunner(unet, CPU, torch.bfloat16, mode="onnx")
    with pytest.raises(ValueError, match="spin must be True, False or 'auto', not 'yes'"):
        ModelRunner(unet, CPU, torch.float32, mode="onnx", spin="yes")


def test_shards_run_single_threaded_and_leave_the_callers_threads_alone(unet):
    before = torch.get_num_threads()
    runner = ModelRunner(unet, CPU, torch.float32, torch.channels_last, "script", workers=2)
    with torch.inference_mode():
        runner(*_inputs(4))
    pool = runner._pool
    assert {pool.submit(torch.get_num_threads).result() for _ in range(4)} == {1}
    assert torch.get_num_threads() == before
    runner.close()


def test_engine_gives_the_same_images_scripted_and_eager(unet):
    d = Diffusion()
    seeds = [5, 6, 7]
    eager = generate(SamplerEngine(unet, d, runner="eager"), seeds, "ddim", 30, batch_size=3)
    script = SamplerEngine(unet, d, runner="script", workers=2)
    assert script.runner.mode == "script"
    scripted = generate(script, seeds, "ddim", 30, batch_size=3)
    assert nearly_equal(eager, scripted)


# ---- ONNX Runtime (model/runner_onnx.py) ---------------------------------------------------------------------

def test_auto_runs_onnx_on_cpu_and_falls_back_to_script_without_onnxruntime(unet, tmp_path, monkeypatch):
    assert ModelRunner(unet, CPU, torch.float32, cache_dir=tmp_path).mode == "onnx"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    assert ModelRunner(unet, CPU, torch.float32, cache_dir=tmp_path).mode == "script"
    assert ModelRunner(unet, CPU, torch.float32, mode="onnx", cache_dir=tmp_path).mode == "script"
    with pytest.raises(ValueError, match="'onnx' is for CPU"):
        ModelRunner(unet, torch.device("cuda"), torch.float32, mode="onnx")


def _export_calls(monkeypatch) -> list:
    calls, real = [], runner_onnx.export
    monkeypatch.setattr(runner_onnx, "export", lambda m, p: (calls.append(p), real(m, p))[1])
    return calls


def test_the_export_is_cached_by_weights_and_a_bad_entry_is_rebuilt(unet, tmp_path, monkeypatch):
    calls = _export_calls(monkeypatch)
    first = OnnxUNet(unet, tmp_path)
    assert len(calls) == 1 and first.path.parent == tmp_path and first.path.exists()
    assert OnnxUNet(unet, tmp_path).path == first.path and len(calls) == 1  # from the cache
    other = UNet(PRESETS["tiny"]).eval()  # other weights: another key
    assert OnnxUNet(other, tmp_path).path != first.path and len(calls) == 2
    x, t = _inputs(2)
    for damage in (b"", b"not an onnx graph", other_graph := OnnxUNet(other, tmp_path).path.read_bytes()):
        first.path.write_bytes(damage)  # truncated, garbage, or a valid graph of other weights
        n = len(calls)
        rebuilt = OnnxUNet(unet, tmp_path)
        assert len(calls) == n + 1, f"a bad cache entry ({len(damage)} bytes) was trusted"
        with torch.inference_mode():
            torch.testing.assert_close(rebuilt(x.contiguous(), t), unet(x, t), rtol=1e-5, atol=1e-5)
    assert other_graph and sorted(p.suffix for p in tmp_path.iterdir()) == [".onnx", ".onnx"]  # no temp files left


def test_a_failed_export_leaves_nothing_in_the_cache(unet, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        Path(args[2]).write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", boom)
    runner = ModelRunner(unet, CPU, torch.float32, mode="onnx", cache_dir=tmp_path)
    assert runner.mode == "script"  # said in the log, and the service's /v1/model says what runs
    assert list(tmp_path.iterdir()) == []


def test_engine_gives_the_same_images_on_onnx_and_eager_and_onnx_is_batch_invariant(unet, tmp_path):
    d = Diffusion()
    seeds = [5, 6, 7]
    eager = generate(SamplerEngine(unet, d, runner="eager"), seeds, "ddim", 30, batch_size=3)
    onnx = SamplerEngine(unet, d, runner="onnx", workers=2)
    assert onnx.runner.mode == "onnx"
    together = generate(onnx, seeds, "ddim", 30, batch_size=3)
    alone = np.concatenate([generate(onnx, [s], "ddim", 30, batch_size=1) for s in seeds])
    assert nearly_equal(together, eager) and nearly_equal(together, alone)


def test_the_engine_feeds_onnx_runtime_nchw_unless_told_otherwise(unet, tmp_path):
    """'auto' is channels_last on CPU (eager and TorchScript run faster so), but ORT takes NCHW buffers: converting
    to channels_last and back would be two copies a step for nothing. An explicit setting is kept."""
    d = Diffusion()
    assert SamplerEngine(unet, d, runner="eager").memory_format == torch.channels_last
    onnx = SamplerEngine(unet, d, runner="onnx", cache_dir=tmp_path)
    assert onnx.runner.mode == "onnx" and onnx.memory_format == torch.contiguous_format
    asked = SamplerEngine(unet, d, runner="onnx", cache_dir=tmp_path, memory_format="channels_last")
    assert asked.memory_format == torch.channels_last
    seeds = [3, 4]
    assert np.array_equal(generate(onnx, seeds, "ddpm", 20), generate(asked, seeds, "ddpm", 20))


def test_spinning_lends_a_small_batch_every_core_and_gives_the_same_bits(tmp_path):
    """With spin, a batch of fewer rows than workers runs on one ORT session with a thread per worker (spinning);
    larger batches keep single-threaded shards. Same outputs, bit for bit, at cpu32's size."""
    torch.manual_seed(0)
    m = UNet(PRESETS["cpu32"]).eval()
    spin = ModelRunner(m, CPU, torch.float32, mode="onnx", workers=2, cache_dir=tmp_path, spin=True)
    quiet = ModelRunner(m, CPU, torch.float32, mode="onnx", workers=2, cache_dir=tmp_path)
    assert spin.fn.spinning and not quiet.spin
    for b in (1, 3):
        x, t = _inputs(b, 32)
        assert torch.equal(spin(x, t), quiet(x, t))
    # (batch, threads) sessions built: batch 1 on 2 threads, 3 as shards of 2 and 1 (and 3: the cache's probe)
    assert set(spin.fn._sessions) == {(1, 2), (1, 1), (2, 1), (3, 1)}
    assert set(quiet.fn._sessions) == {(1, 1), (2, 1), (3, 1)} and not quiet.fn.spinning
    spin.close(), quiet.close()


class _Load:
    """A stand-in for model/cpu_load.py's OtherLoad: the other work, in cores, that the test says."""
    def __init__(self, cores):
        self.value = cores

    def cores(self):
        return self.value


def test_auto_spin_spins_only_while_the_cores_are_free_with_the_same_bits(tmp_path):
    """spin="auto": a batch of one takes both cores as spinning threads while other work uses under
    SPIN_IDLE_BELOW cores, and a single-threaded session when it uses more or nobody knows (the first window, or no
    /proc/stat); the chained steps likewise; batches of a row per core take the shards either way."""
    from model.runner import SPIN_IDLE_BELOW

    torch.manual_seed(0)
    m = UNet(PRESETS["tiny"]).eval()
    auto = ModelRunner(m, CPU, torch.float32, mode="onnx", workers=2, cache_dir=tmp_path, spin="auto")
    assert auto.fn.spinning and auto.other_load is not None
    x, t = _inputs(1)
    coef = torch.tensor([[[999.0, 0.9, -0.1, 0.05]], [[998.0, 0.9, -0.1, 0.05]]])  # two steps: (t, a, b, c)
    z = torch.randn(2, 1, 3, 8, 8)
    for load, threads in ((None, 1), (SPIN_IDLE_BELOW + 0.1, 1), (0.9, 1), (SPIN_IDLE_BELOW - 0.1, 2), (0.0, 2)):
        auto.other_load = _Load(load)
        auto.fn._sessions.clear()
        out = auto(x, t)
        assert set(auto.fn._sessions) == {(1, threads)}, load
        chained = auto.steps(x.contiguous(), coef, z)
        assert ("chain", 2, threads) in auto.fn._sessions, load
        if threads == 1:
            ref, ref_chained = out, chained
    assert torch.equal(out, ref) and torch.equal(chained, ref_chained)  # spinning or not: the same bits
    auto.fn._sessions.clear()
    auto(*_inputs(2))  # a row per core: shards, whatever the load
    assert set(auto.fn._sessions) == {(1, 1)}
    auto.close()


def _generate_counting(engine, specs_by_step, steps_limit=5000):
    """Run `engine` to the end, adding specs_by_step[k] once k steps have passed; ({(group, index): image},
    {steps per call seen}, [(group, index, step) of previews])."""
    images, calls, previews, steps = {}, set(), [], 0
    pending = dict(specs_by_step)
    while (len(engine) or pending) and steps < steps_limit:
        for at in [k for k in pending if k <= steps]:
            engine.add(at, pending.pop(at))
        out = engine.step()
        steps += out.steps
        calls.add(out.steps)
        images.update({(g, i): img for g, i, img in out.finished})
        previews += [(g, i, k) for g, i, k, _ in out.previews]
    return images, calls, previews


@pytest.mark.parametrize("spin", [False, True])
def test_chained_steps_give_the_images_of_one_call_per_step(unet, tmp_path, spin):
    """A batch of at most `workers` rows runs CHAIN_STEPS steps per ONNX Runtime call (model/onnx_chain.py): the
    same images as one call per step, for every sampler it takes, alone, two at once, and with rows joining a
    running batch; rows that ask for previews, need the previous x0 (dpm-solver++) or are near their end go one
    step at a time, and their previews come at the same steps."""
    d = Diffusion()
    plan = {0: [SampleSpec(1), SampleSpec(2, "ddim", 45)],
            7: [SampleSpec(3, "ddpm-posterior", 30)],  # 3 rows: single steps until one leaves
            60: [SampleSpec(4, "dpm-solver++", 25)],
            300: [SampleSpec(5, "ddim", 40, preview_every=7)]}
    results = {}
    for chain in (runner_onnx.CHAIN_STEPS, 0):
        engine = SamplerEngine(unet, d, runner="onnx", workers=2, cache_dir=tmp_path, spin=spin)
        assert engine.runner.chain_steps == runner_onnx.CHAIN_STEPS
        engine.runner.chain_steps = chain
        results[chain] = _generate_counting(engine, plan)
        engine.runner.close()
    (chained, calls, previews), (plain, plain_calls, plain_previews) = results[runner_onnx.CHAIN_STEPS], results[0]
    assert calls == {1, runner_onnx.CHAIN_STEPS} and plain_calls == {1}  # the chain ran, and only where it may
    assert sorted(chained) == sorted(plain) and len(plain) == 5
    for key in plain:
        assert nearly_equal(chained[key], plain[key]), key
    assert previews == plain_previews and [k for _, _, k in previews] == [7, 14, 21, 28, 35, 40]
    # alone: chained to the end (45 = 4 calls of 10, then 5 single steps), and the default 1000-step ddpm chain
    engine = SamplerEngine(unet, d, runner="onnx", workers=2, cache_dir=tmp_path, spin=spin)
    alone, calls, _ = _generate_counting(engine, {0: [SampleSpec(2, "ddim", 45)]})
    assert calls == {runner_onnx.CHAIN_STEPS, 1} and nearly_equal(alone[0, 0], plain[0, 1])
    assert nearly_equal(generate(engine, [1])[0], plain[0, 0])


def test_chained_steps_are_refused_where_the_runner_cannot_chain(unet, tmp_path):
    onnx = ModelRunner(unet, CPU, torch.float32, mode="onnx", workers=2, cache_dir=tmp_path)
    script = ModelRunner(unet, CPU, torch.float32, mode="script", workers=2)
    assert onnx.can_chain(1) and onnx.can_chain(2) and not onnx.can_chain(3) and not script.can_chain(1)
    k = onnx.chain_steps
    with pytest.raises(ValueError, match="1 to 2 rows"):
        onnx.steps(torch.zeros(3, 3, 8, 8), torch.zeros(k, 3, 4), torch.zeros(k, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="one row per call"):
        onnx.fn.steps(torch.zeros(2, 3, 8, 8), torch.zeros(k, 2, 4), torch.zeros(k, 2, 3, 8, 8))
    # the copies of the U-Net in a chained graph share one set of (reordered) weights: k index constants more
    import onnx as onnx_lib

    onnx.fn.chain_session(1)
    chained = onnx_lib.load_from_string(onnx.fn._chain_models[k])
    assert len(chained.graph.initializer) == len(onnx.fn._row_graph.graph.initializer) + k
    onnx.close(), script.close()


def test_a_chain_onnx_runtime_cannot_build_falls_back_to_one_step_per_call(unet, tmp_path, monkeypatch, caplog):
    """If the chained graph fails to build (an ORT that refuses the optimized graph, say), the request still gets
    its image, from one call per step, and the runner says so once and stops trying."""
    from model import onnx_chain

    d = Diffusion()
    engine = SamplerEngine(unet, d, runner="onnx", workers=2, cache_dir=tmp_path)
    want = generate(engine, [9], "ddim", 30)
    engine = SamplerEngine(unet, d, runner="onnx", workers=2, cache_dir=tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no such graph")

    monkeypatch.setattr(onnx_chain, "unrolled_chain", broken)
    with caplog.at_level("WARNING", logger="model.runner"):
        got, calls, _ = _generate_counting(engine, {0: [SampleSpec(9, "ddim", 30)]})
    assert calls == {1} and engine.runner.chain_steps == 0 and nearly_equal(got[0, 0], want[0])
    assert sum("chained steps unavailable" in r.message for r in caplog.records) == 1


def test_cuda_graph_buckets_cover_every_batch_with_little_padding():
    from model.runner_cuda import bucket

    assert [bucket(n) for n in (1, 2, 7, 8, 9, 16, 17, 64, 65, 100)] == [1, 2, 7, 8, 16, 16, 24, 64, 96, 128]
    for n in range(1, 300):
        b = bucket(n)
        assert b >= n and (n <= 8 or (b - n) / b < 1 / 2) and bucket(b) == b  # a bucket is its own bucket
        assert n <= 64 or (b - n) < 32
    with pytest.raises(ValueError):
        bucket(0)
