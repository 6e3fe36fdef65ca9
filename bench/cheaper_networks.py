"""What a cheaper network would buy on this CPU: the batch-1 ONNX Runtime forward of the weights' U-Net beside
smaller variants of it (random weights: the time does not depend on their values), and the 1000 forwards of a
full ddpm chain each implies.

    python bench/cheaper_networks.py --weights weights/celeba32-cpu.safetensors --rounds 9 \
        --out bench/results/cheaper-networks-cpu.md   # adds this run to the file

Why it exists: issue 21 asks for `{"n": 1}`, 1000 ddpm steps, in 3 s on 2 cores. With the step's other work chained
into ONNX Runtime calls (model/onnx_chain.py) the 1000 forwards are what is left, and the shipped network's take
longer than that. This says how small a network would have to be before its forwards alone fit, before anyone spends
CPU hours training one. Two rows leave every GroupNorm out: those networks could not be trained as they stand
(floors, not candidates). Each graph is checked against its module, then all are timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from model.runner_onnx import export  # noqa: E402
from model.unet import UNet, UNetConfig, count_parameters  # noqa: E402
from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from report import command, emit, stamp  # noqa: E402
from runner import time_interleaved  # noqa: E402  (bench/runner.py)
from runner_profile import as_fn, session, without_group_norm  # noqa: E402  (bench/runner_profile.py)

OPTIONS = ((2, True), (1, False))  # (ORT intra-op threads, spinning): SPIN_THREADS and the service's default


def variants(cfg: UNetConfig) -> dict[str, tuple[UNetConfig, bool]]:
    """label -> (config, GroupNorm left out): the weights' own network and cheaper ones derived from it."""
    base = max(4, cfg.base_channels * 3 // 4)
    fewer = cfg.channel_mult[:-1] or cfg.channel_mult
    shallower = dataclasses.replace(cfg, channel_mult=fewer, attn_resolutions=())
    return {
        "the weights' own network": (cfg, False),
        "no attention in the levels (the middle one kept)": (dataclasses.replace(cfg, attn_resolutions=()), False),
        f"base {base} channels instead of {cfg.base_channels}": (
            dataclasses.replace(cfg, base_channels=base, num_groups=math.gcd(base, cfg.num_groups)), False),
        f"one level fewer (mult {'-'.join(map(str, fewer))}, no level attention)": (shallower, False),
        "the weights' own, every GroupNorm left out (floor)": (cfg, True),
        "one level fewer, every GroupNorm left out (floor)": (shallower, True),
    }


def optimized_nodes(path: Path) -> int:
    """How many nodes ONNX Runtime runs for the graph once it has fused what it can (batch 1)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_free_dimension_override_by_name("batch", 1)
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return len(onnx.load(so.optimized_model_filepath).graph.node)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="whose U-Net the variants are derived from")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    p.add_argument("--min-seconds", type=float, default=0.3, help="per graph per round")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import onnxruntime

    cfg = load_weights(a.weights).unet.config
    x = np.random.default_rng(0).standard_normal((1, cfg.in_channels, cfg.image_size, cfg.image_size), np.float32)
    feeds = {"x": x, "t": np.array([500.0], np.float32)}
    torch.manual_seed(0)
    facts, fns = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for i, (label, (c, no_norm)) in enumerate(variants(cfg).items()):
            module = UNet(c).eval()
            if no_norm:
                module = without_group_norm(module)
            path = Path(d) / f"{i}.onnx"
            export(module, path)
            with torch.inference_mode(), FlopCounterMode(display=False) as fc:
                ref = module(torch.from_numpy(x), torch.from_numpy(feeds["t"])).numpy()
            facts[label] = (count_parameters(module), fc.get_total_flops(), optimized_nodes(path))
            for threads, spin in OPTIONS:
                s = session(path, threads, spin)
                np.testing.assert_allclose(s.run(None, feeds)[0], ref, rtol=1e-4, atol=1e-4)  # each its own module
                fns[label, threads, spin] = as_fn(s)
        # interleaved rounds at batch 1 (checked above, so none against time_interleaved's one module)
        [(_, ms)] = time_interleaved(fns, module, [1], a.rounds, a.min_seconds, unchecked=frozenset(fns))

    lines = ["# What a cheaper network would buy (batch-1 ONNX Runtime forward)", "",
             f"{stamp()}, "
             f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}",
             f"- derived from: {Path(a.weights).name} ({cfg.image_size}px, base {cfg.base_channels}, mult "
             f"{'-'.join(map(str, cfg.channel_mult))}, attention at {list(cfg.attn_resolutions)})",
             f"- command: `{command(__file__, argv)}`", "",
             f"ms per forward, best (median) of {a.rounds} interleaved rounds of ~{a.min_seconds:g} s (the same "
             "figures are seconds for the 1000 forwards of a 1000-step request, what it cannot beat; ORT nodes: "
             "after its graph optimizations):", "",
             "| network | parameters | MFLOP | ORT nodes | 2 threads, spinning | 1 thread |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, (params, flops, nodes) in facts.items():
        spin, one = ms[label, 2, True], ms[label, 1, False]
        lines.append(f"| {label} | {params:,} | {flops / 1e6:.0f} | {nodes} | {spin[0]:.2f} ({spin[1]:.2f}) | "
                     f"{one[0]:.2f} ({one[1]:.2f}) |")
    emit(lines, a.out, append=True)  # runs add up in one file: on this VM one run is not enough


if __name__ == "__main__":
    main()
