"""How the CPU preset was chosen: U-Net forward time of candidate configs at batch 1 and 4 on this machine.

    python bench/cpu_preset.py --out bench/results/cpu-preset.md

Budget (issue: shipped CPU weights): a 1000-step ddpm request for 4 images within 30 s end to end on 2 cores,
so one batch-4 forward must take well under 30 ms. Each candidate is timed eagerly and through the runner the
service uses (model/runner.py: frozen TorchScript, one shard per thread). FLOPs are counted with FlopCounterMode.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.runner import ModelRunner  # noqa: E402
from model.unet import PRESETS, UNet, UNetConfig, count_parameters  # noqa: E402
from report import command, emit, stamp  # noqa: E402

CANDIDATES = {
    "cpu32 (shipped): 32px, base 16, mult 1-2-4, 1 res block, attn 8": PRESETS["cpu32"],
    "32px, base 16, mult 1-2-4, 2 res blocks": UNetConfig(image_size=32, base_channels=16, channel_mult=(1, 2, 4),
                                                          num_res_blocks=2, attn_resolutions=(8,), num_groups=8),
    "32px, base 24, mult 1-2-2, 1 res block": UNetConfig(image_size=32, base_channels=24, channel_mult=(1, 2, 2),
                                                         num_res_blocks=1, attn_resolutions=(8,), num_groups=8),
    "32px, base 32, mult 1-2-2, 1 res block": UNetConfig(image_size=32, base_channels=32, channel_mult=(1, 2, 2),
                                                         num_res_blocks=1, attn_resolutions=(8,), num_groups=8),
    "64px, base 16, mult 1-2-4-8, 1 res block": UNetConfig(image_size=64, base_channels=16,
                                                           channel_mult=(1, 2, 4, 8), num_res_blocks=1,
                                                           attn_resolutions=(8,), num_groups=8),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = []
    for name, cfg in CANDIDATES.items():
        m = UNet(cfg).eval().to(memory_format=torch.channels_last)
        runners = {"eager": m, "runner": ModelRunner(m, torch.device("cpu"), torch.float32, torch.channels_last)}
        times = {}
        for b in (1, 4):
            x = torch.randn(b, 3, cfg.image_size, cfg.image_size).to(memory_format=torch.channels_last)
            t = torch.full((b,), 500.0)
            with torch.inference_mode():
                with FlopCounterMode(display=False) as fc:
                    m(x, t)
                for kind, f in runners.items():
                    for _ in range(3):
                        f(x, t)
                    t0 = time.perf_counter()
                    for _ in range(a.reps):
                        f(x, t)
                    times[kind, b] = (time.perf_counter() - t0) / a.reps
            flops = fc.get_total_flops() / b
        rows.append(f"| {name} | {count_parameters(m) / 1e6:.2f}M | {flops / 1e9:.3f} | "
                    f"{times['eager', 1] * 1e3:.1f} / {times['runner', 1] * 1e3:.1f} | "
                    f"{times['eager', 4] * 1e3:.1f} / {times['runner', 4] * 1e3:.1f} | "
                    f"{times['runner', 4] * 1000:.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        "# CPU preset: U-Net forward time of candidates", "",
        f"{stamp()}, "
        f"{torch.get_num_threads()} torch threads, fp32, channels_last, torch {torch.__version__}",
        f"- command: `{command(__file__, argv)}`", "",
        "Forward times: eager / the service's runner (model/runner.py).", "",
        "| config | params | GFLOP/img | fwd b=1 ms | fwd b=4 ms | 1000 steps at b=4 with the runner, s (U-Net only) |",
        "| --- | --- | --- | --- | --- | --- |"] + rows) + "\n"
    emit(text, a.out)


if __name__ == "__main__":
    main()
