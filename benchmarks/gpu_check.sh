#!/usr/bin/env bash
# The prepared GPU check, one device call of at most 8.5 minutes (run it with timeout_s 540):
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh /tmp/gpu_check   # the script itself, on a CPU
#
# 1. the CUDA tests (tests/test_cuda.py);
# 2. sampling at the release's evaluation settings, eager against compiled (the block "sampling" below);
# 3. training speed and peak memory of each released config, with and without gradient checkpointing,
#    at batch 64 (64×64 models) and 32 (256×256 models) per GPU.
# Each step has its own time limit, so a slow one cannot eat the others' time; every result is written
# to OUT_DIR as soon as it exists (markdown tables and bench.py's JSON).
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
quick=${QUICK:-0}

parts=${PARTS:-tests sampling training}  # e.g. PARTS=sampling: that block alone (about 7.5 minutes at most)
part() { [[ " $parts " == *" $1 "* ]]; }

nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || true
if part tests; then
    FRACTALGEN_TEST_DEVICE=$device timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        -k "not compiled" > "$out/cuda_tests.txt" 2>&1
    echo "CUDA tests: $(tail -n 1 "$out/cuda_tests.txt")"
fi

bench() {  # bench LABEL SECONDS bench.py-arguments...
    local label=$1 seconds=$2
    shift 2
    timeout "$seconds" $py benchmarks/bench.py --device "$device" --amp bf16 --class_num 1000 --repeats 3 \
        --markdown --json "$out/$label.json" "$@" > "$out/$label.md" 2>"$out/$label.err"
    echo "$label: exit $?"
}

# ----------------------------------------------------------------------------- sampling (issue 14)
# The release's evaluation settings (its README: FractalMAR-64 num_iter 64,16, cfg 6.5, temperature
# 1.02; FractalMAR-L 64,16,16, cfg 21, temperature 1.1, guiding pixel), fp16 autocast as it samples,
# random weights: eager sampling against the compiled paths of util/fast_sampling.py (CUDA graphs),
# images/s and utilization (FLOPs from benchmarks/scaling.py). One timed call each: the eager calls
# of FractalMAR-L at 64,16,16 take minutes. tests/test_cuda.py's compiled tests print whether the
# compiled samples are the eager ones, or else how far apart their NLLs are.
# SAMPLE_BATCHES="in64 large" overrides the batches (default 128 and 64).
sampling() {
    read -r batch_in64 batch_large <<< "${SAMPLE_BATCHES:-128 64}"
    local release_in64="--num_iter_list 64,16 --cfg 6.5 --temperature 1.02"
    local release_large="--guiding_pixel --num_iter_list 64,16,16 --cfg 21 --temperature 1.1"
    local fast="--tasks sample --amp fp16 --repeats 1 --min_time 0 --warmup_calls 0 --level_flops"
    if [ "$quick" = 1 ]; then  # tiny models: checks the script, measures nothing
        bench sample_compiled_tiny 400 --model fractalmar_tiny_in16 --guiding_pixel --batch 4 \
            --num_iter_list 2,2 --cfg 21 $fast --amp fp32 --sample_compile head --sample_compile_backend aot_eager
        return
    fi
    FRACTALGEN_TEST_DEVICE=$device timeout 90 $py -m pytest -q -s -p no:cacheprovider tests/test_cuda.py \
        -k compiled > "$out/sampling_equality.txt" 2>&1
    echo "sampling equality: $(tail -n 1 "$out/sampling_equality.txt")"
    bench sample_release_fractalmar_in64 150 --model fractalmar_in64 --batch "$batch_in64" $release_in64 $fast \
        --sample_compile head
    bench sample_release_fractalmar_large_in256 210 --model fractalmar_large_in256 --batch "$batch_large" \
        $release_large $fast --sample_compile head --no_same_samples
}

if [ "$quick" = 1 ]; then  # tiny models and batches: checks the script, measures nothing
    bench sample_tiny 300 --model fractalmar_tiny_in16 --tasks sample --batch 4 --num_iter_list 4,2
    part sampling && sampling
    bench train_tiny 300 --model fractalar_tiny_in16 --tasks train,train_ckpt --train_batch 4
    exit 0
fi
part sampling && sampling
part training || exit 0
for model in fractalar_in64 fractalmar_in64; do
    bench "train_$model" 40 --model "$model" --tasks train,train_ckpt --train_batch 64
done
for model in fractalmar_base_in256 fractalmar_large_in256 fractalmar_huge_in256; do
    bench "train_$model" 40 --model "$model" --guiding_pixel --tasks train,train_ckpt --train_batch 32
done
