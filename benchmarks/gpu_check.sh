#!/usr/bin/env bash
# The prepared GPU check, one device call of at most 8.5 minutes (run it with timeout_s 540):
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh /tmp/gpu_check   # the script itself, on a CPU
#
# 1. the CUDA tests (tests/test_cuda.py);
# 2. sampling speed of fractalmar_in64 and fractalmar_large_in256 (random weights, bf16, cfg 4.0 linear,
#    the release's num_iter_list) at a large batch;
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

nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || true
FRACTALGEN_TEST_DEVICE=$device timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    > "$out/cuda_tests.txt" 2>&1
echo "CUDA tests: $(tail -n 1 "$out/cuda_tests.txt")"

bench() {  # bench LABEL SECONDS bench.py-arguments...
    local label=$1 seconds=$2
    shift 2
    timeout "$seconds" $py benchmarks/bench.py --device "$device" --amp bf16 --class_num 1000 --repeats 3 \
        --markdown --json "$out/$label.json" "$@" > "$out/$label.md" 2>"$out/$label.err"
    echo "$label: exit $?"
}

if [ "$quick" = 1 ]; then  # tiny models and batches: checks the script, measures nothing
    bench sample_tiny 300 --model fractalmar_tiny_in16 --tasks sample --batch 4 --num_iter_list 4,2
    bench train_tiny 300 --model fractalar_tiny_in16 --tasks train,train_ckpt --train_batch 4
    exit 0
fi
bench sample_fractalmar_in64 90 --model fractalmar_in64 --tasks sample --batch 64 --num_iter_list 64,16
bench sample_fractalmar_large_in256 90 --model fractalmar_large_in256 --guiding_pixel --tasks sample \
    --batch 32 --num_iter_list 64,16,16
for model in fractalar_in64 fractalmar_in64; do
    bench "train_$model" 40 --model "$model" --tasks train,train_ckpt --train_batch 64
done
for model in fractalmar_base_in256 fractalmar_large_in256 fractalmar_huge_in256; do
    bench "train_$model" 40 --model "$model" --guiding_pixel --tasks train,train_ckpt --train_batch 32
done
