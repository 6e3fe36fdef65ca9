"""U-Net forward time on CPU by backend and thread option, side by side in one run: eager PyTorch, the frozen
TorchScript runner, ONNX Runtime (each thread/shape option) and OpenVINO, plus a matmul peak for the "of peak" column.

Interleaved rounds (A, B, C, A, B, C, ...) so that a slow spell on a noisy machine hits every backend alike; the
table gives the best round and the median. Every backend's output is checked against eager first.

    python bench/runner_backends.py --batch 1 4 16 64 --out bench/results/runner-backends-cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.runner import ModelRunner  # noqa: E402
from model.runner_onnx import OnnxUNet, export  # noqa: E402
from model.weights import DEFAULT_WEIGHTS, load_weights  # noqa: E402
from runner import time_interleaved  # noqa: E402  (bench/runner.py, this folder)
from sampler import flops_per_image, matmul_peak_flops  # noqa: E402  (bench/sampler.py)
from report import command, emit, stamp  # noqa: E402


class OpenVinoUNet:
    def __init__(self, module, threads: int):
        import openvino as ov

        with tempfile.TemporaryDirectory() as d:  # the runner's own export, read by OpenVINO's ONNX frontend
            path = Path(d) / "unet.onnx"
            export(module, path)
            model = ov.Core().read_model(str(path))
        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                               "PERFORMANCE_HINT": "LATENCY",
                                                               "INFERENCE_PRECISION_HINT": "f32"})
        self.version = ov.__version__

    def __call__(self, x, t):
        return torch.from_numpy(np.asarray(self.compiled([x.contiguous().numpy(), t.numpy()])[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.3, help="per backend per round")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    import onnxruntime

    threads = torch.get_num_threads()
    peak, peak_at = matmul_peak_flops(torch.device("cpu"), torch.float32)
    peak /= 1e9
    print(f"matmul peak: {peak:.0f} GFLOP/s ({peak_at})", flush=True)
    w = load_weights(a.weights)
    cpu = torch.device("cpu")
    unet = w.unet.eval().to(memory_format=torch.channels_last)
    cache = Path(tempfile.mkdtemp(prefix="onnx-cache-"))
    backends = {
        "eager": ModelRunner(unet, cpu, torch.float32, torch.channels_last, "eager"),
        f"script, {threads} shards": ModelRunner(unet, cpu, torch.float32, torch.channels_last, "script", threads),
        f"ORT, {threads} shards x 1 thread (the runner)": ModelRunner(unet, cpu, torch.float32, torch.channels_last,
                                                                      "onnx", threads, cache_dir=cache),
        f"ORT, 1 session x {threads} threads": OnnxUNet(unet, cache, threads=threads),
        f"ORT, 1 session x {threads} threads, spinning": OnnxUNet(unet, cache, threads=threads, spinning=True),
        f"ORT, {threads} shards, dynamic shape only": ModelRunner(unet, cpu, torch.float32, torch.channels_last,
                                                                  "onnx", threads, cache_dir=cache, static_max=0),
        f"OpenVINO, {threads} threads": OpenVinoUNet(unet, threads),
    }
    ov_version = backends[f"OpenVINO, {threads} threads"].version
    cfg = unet.config
    gflop = flops_per_image(unet, cfg.image_size, cpu, torch.float32) / 1e9
    rows = time_interleaved(backends, unet, a.batch, a.rounds, a.min_seconds)

    names = list(backends)
    runner = names[2]
    lines = [
        "# U-Net forward on CPU by backend (model/runner.py, model/runner_onnx.py)",
        "",
        f"{stamp()}, "
        f"{threads} threads, fp32, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"OpenVINO {ov_version}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- weights: {Path(a.weights).name} ({cfg.image_size}px, base {cfg.base_channels}), {gflop:.3f} GFLOP per "
        f"image per forward (torch's FlopCounterMode)",
        f"- matmul peak: {peak:.0f} GFLOP/s (best of 512/1024/2048 square fp32 matmuls in torch and ONNX Runtime x 5 "
        f"repeats, at {peak_at})",
        f"- command: `{command(__file__)}`",
        f"- {a.rounds} interleaved rounds; ms per forward, best round (median); the last two columns are the "
        "runner's (ORT, sharded)",
        "",
        "| batch | " + " | ".join(names) + " | runner vs script | runner, % of matmul peak |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- | --- |",
    ]
    for b, res in rows:
        cells = [f"{res[n][0]:.2f} ({res[n][1]:.2f})" for n in names]
        pct = gflop * b / (res[runner][0] / 1e3) / peak * 100
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {res[names[1]][0] / res[runner][0]:.2f}x | {pct:.0f}% |")
    emit(lines, a.out)


if __name__ == "__main__":
    main()
