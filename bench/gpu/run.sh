#!/usr/bin/env bash
# One prepared run on a lent GPU (issue 18): CUDA tests, a 64x64 model trained for a fixed wall-clock budget on the
# carried CelebA tar, samples for evaluation, and the GPU benchmarks against diffusers. Installs nothing but the
# carried wheels; every result lands under $OUT (at most 8 files come back: see the end).
#
#   here, once:  mkdir -p .data && cp ../shared/data/celeba/img_align_celeba_89x109_000001-009000.tar .data/celeba.tar
#                bash bench/gpu/wheels.sh   (the service's wheels, into .whl/); both folders are git-ignored
#   device:      run(command="bash bench/gpu/run.sh", carry=[".whl", ".data"], timeout_s=600)
#   CPU check:   OUT=/tmp/gpu-out SMOKE=1 bash bench/gpu/run.sh   (tiny presets, 30 s of training, few steps)
#
# Stages run in order of value, each under `timeout` within one overall deadline (TOTAL_S), so a stage that
# fails or overruns costs only itself; the log says which ran, how long, and with what exit status.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for results}"
SMOKE=${SMOKE:-0}
TOTAL_S=${TOTAL_S:-570}
START=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TQDM_MININTERVAL=5
if [ "$SMOKE" = 1 ]; then  # the same stages on this CPU, in minutes
    TRAIN_S=${TRAIN_S:-30} CANDIDATES=${CANDIDATES:-"cpu32 tiny"} MIN_STEPS=${MIN_STEPS:-40} BATCH=${BATCH:-16}
    BENCH_PRESET=tiny BENCH_STEPS="20 10" BENCH_BATCH="1 4" EVAL_N=64 SERVICE_S=5 RUNNERS="auto eager"
    DTYPES="fp32" GRID_STEPS=100 DDPM_STEPS=50
else
    TRAIN_S=${TRAIN_S:-200} CANDIDATES=${CANDIDATES:-"celeba64-9m celeba64-5m celeba64-2m"} MIN_STEPS=${MIN_STEPS:-5000}
    BATCH=${BATCH:-128} BENCH_PRESET=celeba64 BENCH_STEPS="200 200 100 50" BENCH_BATCH="1 4 16 64" EVAL_N=1000
    SERVICE_S=15 RUNNERS="auto eager" DTYPES="bf16 fp32" GRID_STEPS=1000 DDPM_STEPS=1000
fi
RES=$OUT/results  # small text files, packed into one tar at the end
mkdir -p "$RES" runs
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1

left() { echo $((START + TOTAL_S - $(date +%s))); }
stage() {  # stage NAME BUDGET_S COMMAND...: run within min(budget, time left), log rc and seconds
    local name=$1 budget=$2 l t0 rc
    shift 2
    l=$(left)
    ((budget > l)) && budget=$l
    if ((budget < 10)); then echo "=== SKIP $name: ${l}s left"; return 1; fi
    echo "=== $name (budget ${budget}s, ${l}s left, $(date -u +%H:%M:%S))"
    t0=$(date +%s)
    timeout -k 5 "$budget" "$@"
    rc=$?
    echo "=== $name: rc=$rc in $(($(date +%s) - t0))s"
    return $rc
}

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then  # the service's dependencies, absent on the device
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DATA=.data/celeba.tar
[ -f "$DATA" ] || DATA=../shared/data/celeba/img_align_celeba_89x109_000001-009000.tar

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); print('cpus', __import__('os').cpu_count())"

# 1. the CUDA tests (skipped without a GPU)
stage tests-cuda 75 python3 -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py -s 2>&1 | tee "$RES/tests-cuda.txt"

# 2. the model size, from the step rate measured now
stage pick-preset 45 bash -c 'python3 -m train.pick_preset "$@" >runs/preset.txt 2>"$0"; rc=$?; cat "$0"; exit $rc' \
    "$RES/pick-preset.md" --candidates $CANDIDATES --budget "$TRAIN_S" --min-steps "$MIN_STEPS" --batch-size "$BATCH" \
    --seconds 4
P=$(tail -1 runs/preset.txt 2>/dev/null)
case " $CANDIDATES " in *" $P "*) ;; *) P=${CANDIDATES%% *}; echo "pick-preset gave nothing: $P";; esac
echo "preset: $P"

# 3. train for TRAIN_S seconds (checkpoint and sample grid at the end), export fp16 EMA weights
RUN=runs/gpu64
rm -rf "$RUN"
stage train $((TRAIN_S + 60)) python3 -m train --data "$DATA" --range 1-8000 --preset "$P" --batch-size "$BATCH" \
    --steps 1000000 --time-budget "$TRAIN_S" --dropout 0 --log-every 100 --sample-every 1000000 \
    --ckpt-every 1000000 --out "$RUN" --no-progress
cp "$RUN/metrics.jsonl" "$RES/train-log.jsonl" 2>/dev/null
cp "$RUN"/samples/*.png "$RES/" 2>/dev/null
W=runs/celeba-h200-64.safetensors
stage export 30 python3 -m train.export "$RUN" --out "$W" --dtype fp16 \
    --dataset "CelebA img_align_celeba 89x109 (images 1-8000), DDIM framing"

# 4. samples: the 4x4 grid at the default 1000-step ddpm, and EVAL_N images for FID (dpm-solver++ 50, as the CPU model)
if [ -f "$W" ]; then
    stage grid 40 python3 -m model.sample --weights "$W" --n 16 --seed 0 --steps "$GRID_STEPS" --out runs/grid \
        && cp runs/grid/grid.png "$RES/samples-64.png"
    stage eval-images 40 python3 -m model.sample --weights "$W" --n "$EVAL_N" --sampler dpm-solver++ --steps 50 \
        --batch-size 500 --out runs/eval-dpm --npz "$OUT/samples-dpm50.npz"
fi

# 5. sampler vs diffusers' DDPMPipeline, graphs vs eager, per dtype (random-initialised celeba64: speed only)
for dt in $DTYPES; do
    stage "sampler-$dt" 90 python3 bench/sampler.py --preset $BENCH_PRESET --runner $RUNNERS --batch $BENCH_BATCH \
        --steps $BENCH_STEPS --dtype "$dt" --out "$RES/sampler-$dt.md"
    # 6. (after the first dtype) the service: 16 clients with step-level batching vs max batch 1, then latency
    if [ "$dt" = "${DTYPES%% *}" ] && [ -f "$W" ]; then
        stage service-load 100 python3 bench/service_load.py load --weights "$W" --clients 16 \
            --duration "$SERVICE_S" --max-batch 64 1 --body '{"n": 1}' --out "$RES/service-load.md"
        stage service-latency 60 python3 bench/service_load.py latency --weights "$W" --n 1 4 \
            --out "$RES/service-latency.md"
    fi
done

# 7. with what time is left: the same EVAL_N images at the default 1000-step ddpm, and the wider test suite here
if [ -f "$W" ]; then
    stage eval-images-ddpm 90 python3 -m model.sample --weights "$W" --n "$EVAL_N" --batch-size 1000 --steps "$DDPM_STEPS" \
        --out runs/eval-ddpm --npz "$OUT/samples-ddpm1000.npz"
fi
stage tests-wide 120 python3 -m pytest -q -p no:cacheprovider --maxfail=5 tests/test_engine.py tests/test_runner.py \
    tests/test_scheduler.py tests/test_service.py tests/test_jobs.py 2>&1 | tee "$RES/tests-wide.txt" | tail -30

# back: log.txt, samples-*.npz, the weights in parts under 16 MiB, results.tar.gz
if [ -f "$W" ]; then
    sha256sum "$W" | tee "$RES/weights.sha256"
    split -b 15M -d "$W" "$OUT/weights.part"
fi
tar -czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$RES"
ls -la "$OUT"
echo "=== done in $(($(date +%s) - START))s"
