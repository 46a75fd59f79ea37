#!/usr/bin/env bash
# Every GPU measurement of the performance issue in one call of at most 9 minutes on one H100 / H200.
#
#   OUT=/some/folder bash scripts/gpu_checks.sh          # from the repository root
#
# Writes at most 7 small files under $OUT (default: benchmarks/gpu): gpu_checks.log and one JSON per measurement.
# In the order they run (what the performance issue still lacks first; the 540-s budget cuts the tail, which was
# measured on an H100 before):
#   step_vit_small_10_compile.json   ViT-S/16, 2x224 + 10x96, batch 64: the baseline; the fast step with packed
#                                    crops and torch.compile reduce-overhead (CUDA graphs), with and without the
#                                    blocks' own recomputation, with their profiles; hf_dino's loop the same way
#   data_compiled.json          the photometric stage per batch (eager, compiled, blur as taps or convolution) and
#                               end to end with the compiled step and photometric stage, in interleaved rounds:
#                               synthetic crops, uint8 crops through the photometric stage, real JPEGs decoded in
#                               the workers (and on the GPU), the time spent waiting on the loader
#   step_vit_small_10_b128_compile.json   the same recipe at batch 128: baseline and fast with packed crops and
#                                    CUDA graphs
#   check.json                  fast path, packed crops and hf_dino's loop against the baseline on the same batch
#                               (fp32, bf16)
#   step_vit_small_10.json      uncompiled: baseline, loop, fast, fast with packed crops, no-recompute (the
#                               activation levers' memory and cost): peak memory and ratios, the packed profile
#   data.json                   data pipeline per core (PIL baseline vs hf_dino) and end to end, uncompiled
#   (log) ViT-S/16 with 8 local crops, ViT-Ti/16 with 10 and 8; the activation memory of
#   scripts/benchmark_activations.py
# With LEARNING_MINUTES=N (and FASHION_MNIST_DIR holding the Fashion-MNIST idx files), after those, on its own
# time limit: the pretraining issue's full Fashion-MNIST run on the GPU, N minutes of training with the
# schedules fitted to N minutes by a short probe, k-NN against training time:
#   learning_fashion_mnist.json (+ its metrics.jsonl copied beside it as learning_metrics.jsonl)
# That makes 9 files: on the device tool (8 files back at most), write to a folder outside $OUT and tar it
# into $OUT, e.g. OUT=/tmp/gpu LEARNING_MINUTES=10 bash scripts/gpu_checks.sh; tar czf $OUT/gpu.tgz -C /tmp gpu
# The learning run alone, inside one 600-s device call (the issue asks for 88% *within* 10 minutes; on one H100
# the preset ran at 8,224 images/s, about 7.3 s per epoch, so 64 epochs fill about 8 minutes):
#   BUDGET_SECONDS=0 LEARNING_MINUTES=8 LEARNING_EPOCHS=64 FASHION_MNIST_DIR=.gpu/fmnist bash scripts/gpu_checks.sh
# ONLY="name ..." runs those measurements alone (e.g. the tail, in a second call on the still-warm machine:
# ONLY="step_vit_small_10_b128_compile data" BUDGET_SECONDS=200 OUT=/tmp/gpu2 bash scripts/gpu_checks.sh).
# Each measurement runs in its own `timeout`, and the benchmarks rewrite their JSON as results come in, so a
# failure or a timeout in one keeps the others and the partial figures of its own.
#
# Needs: python3 with torch (CUDA), transformers, accelerate, pillow, numpy, scikit-image; no network, no
# `datasets` (nothing on this path imports it), hf_dino from ./src (not installed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
LOG="$OUT/gpu_checks.log"
PYTHON="${PYTHON:-python3}"
BUDGET_SECONDS="${BUDGET_SECONDS:-540}"  # the whole script; the compile runs get what is left
START=$(date +%s)

log() { echo "[gpu_checks $(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# run NAME SECONDS COMMAND...: one measurement in its own time limit; its status goes to the log.
run() {
    local name="$1" limit="$2"
    shift 2
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then
        return
    fi
    local left=$(( BUDGET_SECONDS - ($(date +%s) - START) ))
    if (( left < 20 )); then
        log "SKIP $name: the script's budget is spent"
        return
    fi
    (( limit > left )) && limit=$left
    log "START $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local status=$?
    if (( status == 124 || status == 137 )); then
        log "TIMEOUT $name after ${limit}s (partial results kept in its JSON)"
    elif (( status != 0 )); then
        log "FAILED $name (exit $status)"
    else
        log "DONE $name"
    fi
}

: >"$LOG"
log "environment"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv 2>&1
    "$PYTHON" -c "import torch, transformers, accelerate, PIL, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'pillow', PIL.__version__, 'numpy', numpy.__version__)" 2>&1
    "$PYTHON" -c "import hf_dino, hf_dino.training, hf_dino.data; print('hf_dino', hf_dino.__version__, 'imports without datasets:', 'datasets' not in __import__('sys').modules)" 2>&1
    nproc
} >>"$LOG"

DEVICE="${DEVICE:-cuda}"
# SMOKE=1 shrinks every measurement to a tiny ViT (a dry run of this script on a CPU: DEVICE=cpu SMOKE=1).
TINY=""
DATA_TINY=""
if [[ "${SMOKE:-0}" == 1 ]]; then
    TINY="--override image_size=32 --override patch_size=8 --override hidden_size=64 --override num_hidden_layers=2
          --override num_attention_heads=2 --override intermediate_size=128 --override hidden_dim=96
          --override bottleneck_dim=32 --out-dim 256 --global-size 32 --local-size 16 --batch-size 2 --warmup 1
          --steps 1 --rounds 2"
    DATA_TINY="--images 12 --seconds 0.3 --global-size 32 --local-size 16 --batch-size 2 --warmup 1 --steps 2
               --workers 2 --loader-batches 2 --override image_size=32 --override patch_size=8
               --override hidden_size=64 --override num_hidden_layers=2 --override num_attention_heads=2
               --override intermediate_size=128 --override hidden_dim=96 --override bottleneck_dim=32
               --override out_dim=256"
fi
STEP="$PYTHON scripts/benchmark_step.py --device $DEVICE"
# In order of what the performance issue still needs (the budget cuts the tail). First the MFU (24.2% on an
# H100 with packed crops and CUDA graphs, before the patch projection became a matrix product; the target is
# 25%): packed crops compiled with and without the blocks' own recomputation (under torch.compile the
# partitioner may choose it as well), and hf_dino's loop with packed crops (its unpacked step ran at 2.94x the
# baseline on an H100, the target is 3x). Each compiled variant took 51-65 s to compile and record there, and
# every variant is built before the first timing round: the limit must cover all of them. The profiles say how
# much of the step the GPU is busy and in which kernels.
run step_vit_small_10_compile 280 $STEP --model vit_small_patch16 --local-crops 10 --batch-size 64 --warmup 3 \
    --steps 5 --rounds 3 \
    --variants baseline,fast-packed-compile,fast-packed-compile-no-recompute,trainer-packed-compile \
    --compile-mode reduce-overhead \
    --profile fast-packed-compile,fast-packed-compile-no-recompute,trainer-packed-compile $TINY \
    --json "$OUT/step_vit_small_10_compile.json"
# End to end with the compiled step (CUDA graphs; the packed graph above, from inductor's cache) and the compiled
# photometric stage, in interleaved rounds: synthetic crops, uint8 crops through the photometric stage, real
# JPEGs (and the share of that run spent waiting on the loader). The photometric stage took about 17% of the
# compiled step's time on an H100; --photometric: what it costs per batch of 64, eager and compiled, with the
# blur as shifted multiply-adds (the compiled default now) and as a depthwise convolution (before): GPU busy
# time and its top kernels.
run data_compiled 200 "$PYTHON" scripts/benchmark_data.py --device $DEVICE --skip-per-core --photometric \
    --photometric-batch-size 64 --end-to-end --compile-mode reduce-overhead --variant fast-packed-compile \
    --workers 8 --model vit_small_patch16 --local-crops 10 --batch-size 64 --warmup 6 --steps 30 --rounds 3 \
    $DATA_TINY --json "$OUT/data_compiled.json"
# The same recipe at batch 128 (the activation levers leave room for it): the MFU target does not fix the batch.
run step_vit_small_10_b128_compile 120 $STEP --model vit_small_patch16 --local-crops 10 --batch-size 128 \
    --warmup 3 --steps 5 --rounds 2 --variants baseline,fast-packed-compile --compile-mode reduce-overhead \
    $TINY --json "$OUT/step_vit_small_10_b128_compile.json"
# The fast path, packed crops and hf_dino's loop against the baseline on the same batch (fp32, bf16): the patch
# projection is a matrix product now (cuBLAS instead of cuDNN's convolution).
run check 90 $STEP --check --check-full --check-precision fp32,bf16 --model vit_small_patch16 \
    --local-crops 2 --batch-size 8 $TINY --json "$OUT/check.json"
# The peak memory (measured on an H100: 0.56x the baseline's) and the ratios of the uncompiled step.
run step_vit_small_10 100 $STEP --model vit_small_patch16 --local-crops 10 --batch-size 64 --warmup 3 --steps 5 \
    --rounds 3 --variants baseline,trainer,fast,fast-packed,fast-no-recompute,trainer-packed \
    --profile fast-packed $TINY --json "$OUT/step_vit_small_10.json"
# Measured on an H100 before (benchmarks/gpu): rerun when the budget allows; the step runs print to the log only
# (the device tool returns 8 files at most).
run data 100 "$PYTHON" scripts/benchmark_data.py --device $DEVICE --seconds 2 --end-to-end --workers 8 \
    --model vit_small_patch16 --local-crops 10 --batch-size 64 --warmup 4 --steps 20 $DATA_TINY --json "$OUT/data.json"
run step_vit_small_8 60 $STEP --model vit_small_patch16 --local-crops 8 --batch-size 64 --warmup 3 --steps 5 \
    --rounds 3 --variants baseline,trainer,fast $TINY
run step_vit_tiny_10 60 $STEP --model vit_tiny_patch16 --local-crops 10 --batch-size 64 --warmup 3 --steps 5 \
    --rounds 3 --variants baseline,trainer,fast $TINY
run step_vit_tiny_8 60 $STEP --model vit_tiny_patch16 --local-crops 8 --batch-size 64 --warmup 3 --steps 5 \
    --rounds 3 --variants baseline,trainer,fast $TINY
# What the forward saves for the backward, under CUDA's autocast (log only; the step's peak memory above is the
# measurement, this count says where it comes from).
ACTIVATION_SIZES=""
[[ "${SMOKE:-0}" == 1 ]] && ACTIVATION_SIZES="--batch-sizes 1,2"
run activations 60 "$PYTHON" scripts/benchmark_activations.py --device $DEVICE $ACTIVATION_SIZES

LEARNING_MINUTES="${LEARNING_MINUTES:-0}"
if [[ "$LEARNING_MINUTES" != 0 ]]; then
    # The fashion_mnist preset on a GPU: bf16 and 12 data workers.
    WORK="${TMPDIR:-/tmp}/hf_dino_learning_gpu"
    rm -rf "$WORK"
    LIMIT=$(awk "BEGIN { print int($LEARNING_MINUTES * 60 + 115) }")
    log "START learning_fashion_mnist (limit ${LIMIT}s)"
    # LEARNING_EPOCHS=N skips the probe (it costs up to 2 minutes): N epochs, k-NN every N/8 epochs.
    # (one --set with every override: a second --set would replace the first)
    SETTINGS=(num_workers="${LEARNING_WORKERS:-12}" mixed_precision=bf16)
    FIT=(--fit-epochs)
    if [[ -n "${LEARNING_EPOCHS:-}" ]]; then
        SETTINGS+=(epochs="$LEARNING_EPOCHS" eval_steps=$(( LEARNING_EPOCHS * 234 / 8 )))
        FIT=()
    fi
    timeout --kill-after=10 "$LIMIT" "$PYTHON" scripts/benchmark_learning.py fashion-mnist \
        --data-dir "${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}" \
        --time-budget-minutes "$LEARNING_MINUTES" "${FIT[@]}" --work-dir "$WORK" \
        --set "${SETTINGS[@]}" ${LEARNING_SET:-} --output "$OUT/learning_fashion_mnist.json" >>"$LOG" 2>&1
    log "learning_fashion_mnist exit $?"
    cp "$WORK/fashion_mnist/metrics.jsonl" "$OUT/learning_metrics.jsonl" 2>/dev/null
fi

log "summary"
"$PYTHON" - "$OUT" >>"$LOG" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
for path in sorted(out.glob("step_*.json")):
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(path.name, "unreadable:", error)
        continue
    print(f"== {path.name}: {results['settings']['model']} {results['settings']['crops']}, batch {results['settings']['batch_size']}")
    flops = results.get("flops", {})
    if flops:
        print(f"   FLOPs/image-step analytic {flops['analytic_per_image_step']/1e9:.1f} G, counter/analytic {flops['counter_over_analytic']:.4f}")
    for name, entry in results["variants"].items():
        if "images_per_second" not in entry:
            print(f"   {name:<20} {entry.get('error', 'no timing')[:100]}")
            continue
        memory = entry.get("memory", {})
        print(
            f"   {name:<20} {entry['images_per_second']:8.1f} img/s  x{entry.get('speedup_paired', float('nan')):.2f} paired"
            f"  MFU {100 * entry.get('mfu_vs_measured_matmul', float('nan')):5.1f}%"
            f"  peak {memory.get('peak_bytes', float('nan')) / 2**30:6.2f} GiB"
            f" ({memory.get('peak_over_baseline', float('nan')):.2f} x base)"
            f"  setup peak {entry.get('setup_peak_bytes', float('nan')) / 2**30:6.2f} GiB"
            f" ({entry.get('setup_peak_over_baseline', float('nan')):.2f} x base)"
            f"  syncs {entry.get('syncs', {}).get('per_step', '?')}"
            f"  graphs {entry.get('compiled_graphs', 0)} recompiles {entry.get('recompiles_after_warmup', 0)}"
        )
for name in ("check.json", "data_compiled.json", "data.json"):
    path = out / name
    if path.exists():
        print(f"== {name}")
        text = path.read_text()
        print(text[:3000])
EOF
log "finished"
tail -n 60 "$LOG"
