#!/usr/bin/env bash
# Every CPU measurement behind the README's figures, in one run on a quiet machine (about 20 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE  # bench/thread_policy.py unsets it for its own runs
# The diffusers baselines get their best setting: libgomp's default policy, alone on the cores (under PASSIVE
# DDPMPipeline ran 2.5x slower): sampler.py runs it in a child process without the variable, and the latency run
# below unsets it (the service sets PASSIVE for itself, service/__main__.py).
# Results files name the CPU (bench/report.py). The plain names hold the AVX2 host's runs (until 2026-12-01); the
# *-avx512.md ones were written on the AVX-512 host by the same commands with --out renamed.
W=weights/celeba32-cpu.safetensors
DATA=../shared/data/celeba/img_align_celeba_89x109_000001-009000.tar
python -m model.sample --weights $W --n 16 --seed 0 --out runs/samples-ddpm1000 && cp runs/samples-ddpm1000/grid.png docs/samples.png
python bench/cpu_preset.py --out bench/results/cpu-preset.md
python bench/thread_policy.py --out bench/results/thread-policy-cpu.md
python bench/runner.py --weights $W --batch 1 4 16 64 --out bench/results/runner-cpu.md
python bench/runner_backends.py --weights $W --batch 1 4 16 64 --out bench/results/runner-backends-cpu.md
# With ONNX Runtime's API headers (bench/fused_group_norm.py: from Debian's libonnxruntime-dev) it also times the
# fused GroupNorm+SiLU operator of bench/csrc/; ORT_INCLUDE=/tmp/ort/usr/include/onnxruntime, say.
python bench/runner_profile.py --weights $W ${ORT_INCLUDE:+--ort-include "$ORT_INCLUDE"} \
    --out bench/results/runner-profile-cpu.md
rm -f bench/results/cheaper-networks-cpu.md  # its runs add to the file: three of them
for run in 1 2 3; do python bench/cheaper_networks.py --weights $W --rounds 9 --out bench/results/cheaper-networks-cpu.md; done
rm -f bench/results/chain-in-graph-cpu.md  # its runs add to the file: batch 1 and 2, spinning or not
python bench/chain_in_graph.py --weights $W --rounds 5 --chain 5 10 20 50 --out bench/results/chain-in-graph-cpu.md
python bench/chain_in_graph.py --weights $W --rounds 5 --no-spin --loop --out bench/results/chain-in-graph-cpu.md
python bench/chain_in_graph.py --weights $W --rounds 5 --no-spin --batch 2 --loop --out bench/results/chain-in-graph-cpu.md
python bench/parallel_in_time.py --weights $W --rounds 3 --out bench/results/parallel-in-time-cpu.md
python bench/sampler.py --weights $W --runner auto auto+spin --batch 1 4 16 64 --steps 1000 1000 100 50 --repeat 3 \
    --out bench/results/sampler-cpu.md
env -u OMP_WAIT_POLICY python bench/service_load.py latency --weights $W --n 1 4 --variants default spin script --repeat 5 \
    --out bench/results/service-latency-cpu.md
python bench/service_load.py load --weights $W --clients 1 4 16 64 --duration 20 --max-batch 64 1 \
    --body '{"n": 1, "sampler": "ddim", "steps": 20}' --out bench/results/service-load-cpu.md
python -m train.evaluate --weights $W --data $DATA --range 8001-9000 --n 1000 --sampler dpm-solver++ --steps 50 \
    --batch-size 250 --out docs/eval-celeba32-cpu.json
