#!/usr/bin/env bash
# The prepared GPU check: one device call per part list, each at most 8.5 minutes.
#
#   bash benchmarks/gpu_check.sh OUT_DIR                               # on the GPU machine: tests, train
#   PARTS="sample" bash benchmarks/gpu_check.sh OUT_DIR                # the sampling part (about 3 minutes)
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh /tmp/gpu_check      # the script itself, on a CPU, tiny models
#
# Parts (PARTS, space-separated; default "tests train", about 8.4 minutes of step limits):
#   tests   the CUDA tests (tests/test_cuda.py);
#   train   (1) side by side against the release: fractalmar_in64 at batch 64 and fractalmar_large_in256
#           --guiding_pixel at batch 32, fp16 autocast with a GradScaler as the release trains, gradient
#           checkpointing, the same random weights (strict load), mask ratios fixed in both
#           (benchmarks/release.py): s/step, img/s, utilization, peak memory, mean training loss;
#           (2) ours with --compile against ours eager (fractalmar_in64, batch 64);
#           (3) the released-batch table (benchmarks/train_table.py): every released config at batch 64
#           (64×64) or 32 (256×256, --guiding_pixel), fp16 and bf16, with and without gradient
#           checkpointing: step time and peak memory;
#   sample  (one more call, about 7.5 minutes at most) sampling at the release's evaluation settings,
#           eager against the compiled paths of util.sampling.compile_sampling (see the block below), and the
#           compiled-sampling equality tests of tests/test_cuda.py.
# Each step has its own time limit, so a slow one cannot eat the others' time; every result is written
# to OUT_DIR as soon as it exists (markdown and bench.py's JSON; the table row by row).
#
# The device machine gets only the checkout. Before the call, in the repository root here:
#   mkdir -p shared_copy && cp -r ../shared/upstream shared_copy/   # the release (git-ignored: shared_copy/)
#   (tests/test_cuda.py's CLI test scores with torch-fidelity, absent there: its wheel goes in .whl/, which
#   .git/info/exclude ignores; see /work/.library/device/README.md and /work/shared/NOTES.md)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .whl \
#       torch-fidelity==0.4.0
# then run with carry ["shared_copy", ".whl"] and timeout_s 540:
#   bash benchmarks/gpu_check.sh $OUT
# The script installs .whl/*.whl into /tmp/site itself when .whl exists.
set -u
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then parts=${PARTS:-tests train sample}; else parts=${PARTS:-tests train}; fi
release=${RELEASE:-shared_copy/upstream/fractalgen}
[ -d "$release" ] || release=../shared/upstream/fractalgen  # on the machine that has it beside the checkout

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
has() { case " $parts " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
nvidia-smi > "$out/nvidia_smi.txt" 2>&1 || true

bench() {  # bench LABEL SECONDS AMP bench.py-arguments...
    local label=$1 seconds=$2 amp=$3
    shift 3
    timeout "$seconds" $py benchmarks/bench.py --device "$device" --amp "$amp" --class_num 1000 --repeats 3 \
        --markdown --json "$out/$label.json" "$@" > "$out/$label.md" 2>"$out/$label.err"
    echo "$label: exit $?"
}

table() {  # table SECONDS train_table.py-arguments...: rows appended to train_table.md
    local seconds=$1
    shift
    timeout "$seconds" $py benchmarks/train_table.py --device "$device" --out "$out/train_table.md" "$@" \
        >> "$out/train_table.log" 2>&1
    echo "train_table $*: exit $?"
}

if has tests; then
    FRACTALGEN_TEST_DEVICE=$device timeout 90 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py \
        -k "not compiled" > "$out/cuda_tests.txt" 2>&1
    echo "CUDA tests: $(tail -n 1 "$out/cuda_tests.txt")"
fi

if has train; then
    echo "| model | batch | precision | grad. ckpt | compiled | s/step | img/s | peak GiB |" > "$out/train_table.md"
    echo "|---|---|---|---|---|---|---|---|" >> "$out/train_table.md"
    if [ "$quick" = 1 ]; then  # tiny models and batches: checks the script, measures nothing
        if [ -d "$release" ]; then
            bench train_vs_release_tiny 300 fp32 --model fractalmar_tiny_in16 --tasks train,train_ckpt \
                --train_batch 4 --repeats 1 --loss_seeds 2 --compare "$release"
        fi
        bench train_compiled_tiny 300 bf16 --model fractalmar_tiny_in16 --tasks train --train_batch 4 \
            --repeats 1 --loss_seeds 2 --compile --compile_backend aot_eager --no_memory
        bench train_tiny 300 bf16 --model fractalar_tiny_in16 --tasks train,train_ckpt --train_batch 4
        table 300 --model fractalmar_tiny_in16 --batch 4 --amps bf16 --steps 1
    else
        bench train_vs_release_fractalmar_in64 70 fp16 --model fractalmar_in64 --tasks train_ckpt \
            --train_batch 64 --loss_seeds 4 --compare "$release"
        bench train_vs_release_fractalmar_large_in256 75 fp16 --model fractalmar_large_in256 --guiding_pixel \
            --tasks train_ckpt --train_batch 32 --loss_seeds 4 --compare "$release"
        bench train_compiled_fractalmar_in64 110 fp16 --model fractalmar_in64 --tasks train_ckpt \
            --train_batch 64 --loss_seeds 4 --compile
        table 26 --model fractalmar_in64 --batch 64
        table 26 --model fractalar_in64 --batch 64
        table 26 --model fractalmar_base_in256 --guiding_pixel --batch 32
        table 32 --model fractalmar_large_in256 --guiding_pixel --batch 32
        table 46 --model fractalmar_huge_in256 --guiding_pixel --batch 32
    fi
fi

# ----------------------------------------------------------------------------- sample
# The release's evaluation settings (its README: FractalMAR-64 num_iter 64,16, cfg 6.5, temperature
# 1.02; FractalMAR-L 64,16,16, cfg 21, temperature 1.1, guiding pixel), fp16 autocast as it samples,
# random weights: the release, ours eager and ours through the compiled paths of util.sampling.compile_sampling
# (CUDA graphs), one worker each,
# images/s and utilization (FLOPs from benchmarks/scaling.py). One timed call each: the eager calls
# of FractalMAR-L at 64,16,16 take minutes. tests/test_cuda.py's compiled tests print whether the
# compiled samples are the eager ones, or else how far apart their NLLs are.
# SAMPLE_BATCHES="in64 large" overrides the batches (default 128 and 64).
sampling() {
    read -r batch_in64 batch_large <<< "${SAMPLE_BATCHES:-128 64}"
    local release_in64="--num_iter_list 64,16 --cfg 6.5 --temperature 1.02"
    local release_large="--guiding_pixel --num_iter_list 64,16,16 --cfg 21 --temperature 1.1"
    local fast="--tasks sample --repeats 1 --min_time 0 --warmup_calls 0 --level_flops"
    if [ "$quick" = 1 ]; then  # tiny models: checks the script, measures nothing
        bench sample_compiled_tiny 400 fp32 --model fractalmar_tiny_in16 --guiding_pixel --batch 4 \
            --num_iter_list 2,2 --cfg 21 $fast --sample_compile head --sample_compile_backend aot_eager
        return
    fi
    FRACTALGEN_TEST_DEVICE=$device timeout 90 $py -m pytest -q -s -p no:cacheprovider tests/test_cuda.py \
        -k compiled > "$out/sampling_equality.txt" 2>&1
    echo "sampling equality: $(tail -n 1 "$out/sampling_equality.txt")"
    bench sample_release_fractalmar_in64 150 fp16 --model fractalmar_in64 --batch "$batch_in64" $release_in64 $fast \
        --sample_compile head --no_same_samples --compare "$release"
    bench sample_release_fractalmar_large_in256 210 fp16 --model fractalmar_large_in256 --batch "$batch_large" \
        $release_large $fast --sample_compile head --no_same_samples --compare "$release"
}

if has sample; then
    [ "$quick" = 1 ] && bench sample_tiny 300 bf16 --model fractalmar_tiny_in16 --tasks sample --batch 4 --num_iter_list 4,2
    sampling
fi
